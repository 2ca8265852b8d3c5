"""The console's parts: a client of the core API (balancer, optimizer, events), never of its internals.

config.py reads flags, TOML and OLLAMA_HOST and saves node changes (locked, merged, comments kept);
names.py is the one model-name rule and its did-you-mean; commands.py is the one registry that drives
dispatch, help and completion; render.py turns the core's plain return values into rich renderables (all
node text shown as text); toolbar.py and completion.py feed the prompt; history.py keeps the prompt's
history and the log from ever taking the console down; services.py starts the placement history recorder,
the alerter and the `--metrics` server beside the prompt; demo.py starts a simulated cluster for `--demo`.
"""

from flockparse import __version__  # noqa: F401 - one version, the package's (`--version` shows it)
