"""`serve`: the cluster behind one Ollama-compatible address (issue 10).

`build_app(balancer, token=...)` is the aiohttp application (serve/app.py: Ollama's API, balanced);
`run_serve(...)` runs it with the balancer's health monitor and optimizer until SIGTERM/SIGINT
(serve/runner.py). Node calls follow the hostile-node rules in serve/upstream.py.
"""

from __future__ import annotations

from flockparse.serve.app import build_app

__all__ = ["build_app"]
