"""The dashboard's server side without a browser: the page's headers and routes on serve, the history's
`buckets`, and the console's `--dashboard` (its own server over the console's balancer, the flag's errors,
the attached console's line)."""

from __future__ import annotations

import requests
from helpers import wait_until

from flockparse.dashboard import DASHBOARD_PATH

TOKEN = "dash-s3cret"


def test_the_page_is_served_with_its_security_headers(sim_node, serve_over) -> None:
    server = serve_over([sim_node(vram_gb=0)], token=TOKEN)
    page = requests.get(server.url + DASHBOARD_PATH, timeout=10)  # no token: the page holds no data
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "default-src 'none'" in policy
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert '<script type="module" src="main.js"></script>' in page.text and "<script>" not in page.text
    module = requests.get(server.url + DASHBOARD_PATH + "main.js", timeout=10)
    assert module.headers["Content-Type"].startswith("text/javascript") and "innerHTML" not in module.text
    assert requests.get(server.url + DASHBOARD_PATH + "nope.js", timeout=10).status_code == 404
    assert requests.get(server.url + DASHBOARD_PATH + "..%2f__init__.py", timeout=10).status_code == 404
    bare = requests.get(server.url + DASHBOARD_PATH.rstrip("/"), allow_redirects=False, timeout=10)
    assert bare.status_code == 302 and bare.headers["Location"] == DASHBOARD_PATH
    ollama = requests.get(server.url + "/", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert ollama.text == "Ollama is running"  # `/` stays Ollama's
    assert requests.get(server.url + "/flockparse/v1/status", timeout=10).status_code == 200  # loopback reads


def test_history_buckets_are_asked_for_and_checked(sim_node, serve_over) -> None:
    server = serve_over([sim_node(vram_gb=24, preload=[("llama3.1", "gpu")])])
    history = server.url + "/flockparse/v1/history"
    wait_until(lambda: requests.get(history, timeout=10).json()["models"], "llama3.1 recorded")
    [pair] = requests.get(history, params={"buckets": "96"}, timeout=10).json()["models"]
    assert len(pair["timeline"]) == 96 and pair["timeline"][-1] == "gpu"
    assert len(requests.get(history, timeout=10).json()["models"][0]["timeline"]) == 24  # the default
    for bad in ("0", "481", "x", "-3"):
        reply = requests.get(history, params={"buckets": bad}, timeout=10)
        assert reply.status_code == 400 and "buckets must be" in reply.json()["error"]
