"""`python3 -m ollama_sim ...`: one simulated Ollama node on 127.0.0.1 (flags in cli.py)."""

import sys

from ollama_sim.cli import main

sys.exit(main())
