"""The bottom toolbar: a pure function of a small state dict -> prompt_toolkit style fragments.

Colours live only in TOOLBAR_STYLE (litecli's clitoolbar pattern); `toolbar_state` gathers the state from
the balancer's in-memory counts (no network I/O, and no copy of any node's state: it runs every second).
"""

from __future__ import annotations

from typing import Any

from prompt_toolkit.styles import Style

from flockparse.console.render import human_seconds, short_url

TOOLBAR_STYLE = Style.from_dict(
    {
        "bottom-toolbar": "noreverse bg:#222222 #aaaaaa",
        "bottom-toolbar.ok": "bg:#222222 #5fd75f bold",
        "bottom-toolbar.warn": "bg:#222222 #ffaf00 bold",
        "bottom-toolbar.bad": "bg:#222222 #ff5f5f bold",
        "bottom-toolbar.dim": "bg:#222222 #777777",
    }
)


def toolbar_state(balancer: Any) -> dict[str, Any]:
    """Counts from summary() and the optimizer_status(): in-memory reads in the core that copy no node's
    models (node_states() would snapshot every node's models on every redraw)."""
    counts = balancer.summary()
    status = balancer.optimizer_status()
    return {
        "nodes_total": counts.get("total", 0),
        "nodes_online": counts.get("online", 0),
        "nodes_gpu": counts.get("gpu", 0),
        "optimizer_running": bool(status.get("running")),
        "next_pass_in": status.get("next_pass_in"),
        "serve": counts.get("serve"),  # attached (--connect): {'url', 'online'}
    }


def toolbar_fragments(state: dict[str, Any]) -> list[tuple[str, str]]:
    """` 2/3 nodes online  1 with GPU  optimizer on, next pass in 12s  [F1/help] `, and when attached
    `  serve 127.0.0.1:11435` (or `... unreachable`)."""
    total, online = state.get("nodes_total", 0), state.get("nodes_online", 0)
    health = "ok" if total and online == total else "warn" if online else "bad"
    fragments = [
        ("class:bottom-toolbar", " "),
        (f"class:bottom-toolbar.{health}", f"{online}/{total}"),
        ("class:bottom-toolbar", " nodes online  "),
        (
            "class:bottom-toolbar.ok" if state.get("nodes_gpu") else "class:bottom-toolbar.dim",
            str(state.get("nodes_gpu", 0)),
        ),
        ("class:bottom-toolbar", " with GPU  optimizer "),
    ]
    if state.get("optimizer_running"):
        fragments.append(("class:bottom-toolbar.ok", "on"))
        next_in = state.get("next_pass_in")
        if next_in is not None:
            fragments.append(("class:bottom-toolbar", f", next pass in {human_seconds(float(next_in))}"))
    else:
        fragments.append(("class:bottom-toolbar.warn", "off"))
    serve = state.get("serve")
    if serve:
        fragments.append(("class:bottom-toolbar", "  serve "))
        if serve.get("online") is False:
            fragments.append(("class:bottom-toolbar.bad", f"{short_url(serve.get('url'))} unreachable"))
        else:
            fragments.append(("class:bottom-toolbar.ok", short_url(serve.get("url"))))
    fragments.append(("class:bottom-toolbar.dim", "  [Tab] complete  [help]  [Ctrl-D] exit "))
    return fragments
