"""`python3 -m ollama_sim --port 11434 ...`: one simulated Ollama node on 127.0.0.1 (see cli.main)."""

import sys

from ollama_sim.server import main

sys.exit(main())
