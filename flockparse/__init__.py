"""FlockParse: keep an Ollama cluster's models on GPU."""

__version__ = "0.1.0"
