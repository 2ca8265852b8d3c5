"""The dashboard in a real browser (issue 12 item 1): Debian's headless Chromium driven by Selenium through
/usr/bin/chromedriver (never Selenium Manager: nothing is downloaded), against a serve in this process over
simulated nodes on real sockets.

The page loads and lists the nodes; a placement changed in the simulator or through the control API shows
without a reload; a button moves a model, shows the reply's message and the simulator holds the model where
asked; the token form works on a serve that wants a token; a node's text with markup is shown as text.
Screenshots at desktop and phone sizes go to $FLOCKPARSE_SCREENSHOTS (else the test's temporary directory).

Skipped only when Chromium is absent and FLOCKPARSE_REQUIRE_BROWSER is not set (.ci/run sets it).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web
from helpers import LLAMA, wait_until
from serve_support import ServeThread

from flockparse.console.services import Services
from flockparse.dashboard import DASHBOARD_PATH
from flockparse.events import Event

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REQUIRED = bool(os.environ.get("FLOCKPARSE_REQUIRE_BROWSER"))
EMBED = "mxbai-embed-large:latest"
SMALL = "llama3.2:3b"
DESKTOP, PHONE = (1280, 1000), (390, 844)
TOKEN = "dash-s3cret"

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()) and not REQUIRED:
    pytestmark = pytest.mark.skip(reason="no /usr/bin/chromium and chromedriver (apt-get install chromium "
                                  "chromium-driver; FLOCKPARSE_REQUIRE_BROWSER=1 fails instead)")  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module (a fresh profile; nothing that reaches beyond loopback)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.TemporaryDirectory(prefix="flockparse-chromium-")
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile.name}",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(10)
    try:
        yield driver
    finally:
        driver.quit()
        profile.cleanup()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """The browser at desktop size with a clean tab state; the test's console errors are checked at the end
    (a Content-Security-Policy violation or a script error is a SEVERE entry)."""
    browser.set_window_size(*DESKTOP)
    browser.get("about:blank")
    browser.get_log("browser")  # drop what earlier tests left
    yield browser
    severe = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    # the browser logs the API's refusals the page handles: 401 (the token form), 404 (history off)
    expected = ("401 (Unauthorized)", "404 (Not Found)")
    assert [m for m in severe if not any(e in m for e in expected)] == []


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("FLOCKPARSE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ------------------------------------------------------------------------------------------ helpers
def js(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def row(node: str, model: str) -> str:
    """The CSS selector of one model's row on one node (attribute values quoted as CSS strings)."""
    return f'li.model[data-node="{node}"][data-model="{model}"]'


def row_class(driver: Any, node: str, model: str) -> str | None:
    return js(driver, "const r = document.querySelector(arguments[0]); return r ? r.className : null;",
              row(node, model))  # fmt: skip


def result_class(driver: Any, node: str, model: str) -> str:
    """The class of the row's result line: `running`, `ok` or `failed` ("" before any action)."""
    return js(driver, "const r = document.querySelector(arguments[0]); return r ? r.className : '';",
              row(node, model) + " .result")  # fmt: skip


def text_of(driver: Any, selector: str) -> str | None:
    return js(driver, "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
              selector)  # fmt: skip


def click(driver: Any, selector: str) -> None:
    """A real click on the element; found again if the page rebuilt it between finding and clicking."""
    from selenium.common.exceptions import StaleElementReferenceException

    def clicked() -> bool:
        try:
            driver.find_element("css selector", selector).click()
        except StaleElementReferenceException:
            return False
        return True

    wait_until(clicked, f"a click on {selector}")


def open_page(driver: Any, server: ServeThread) -> None:
    driver.get(server.url + DASHBOARD_PATH)
    js(driver, "window.__sameDocument = 'yes';")  # gone if the page ever reloads


def live(driver: Any) -> bool:
    return text_of(driver, "#connection") == "live"


def screenshot(driver: Any, folder: Path, name: str, size: tuple[int, int]) -> Path:
    """At `size`, then as tall as the page, so the whole page is in the picture."""
    driver.set_window_size(*size)
    height = js(driver, "return document.documentElement.scrollHeight;")
    driver.set_window_size(size[0], min(max(size[1], height + 120), 5000))
    wait_until(lambda: js(driver, "return document.readyState;") == "complete", "the page settled")
    path = folder / f"dashboard-{name}.png"
    assert driver.save_screenshot(str(path)) and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path


# ------------------------------------------------------------------------------------------ tests
def test_the_page_lists_the_nodes_and_follows_placements_without_a_reload(
    sim_node, serve_over, page, shots: Path
) -> None:
    gpu = sim_node(vram_gb=24, preload=[("llama3.1", "gpu"), ("mxbai-embed-large", "gpu")])
    cpu = sim_node(vram_gb=0, preload=[("llama3.1", "auto")])
    server = serve_over([gpu, cpu])
    open_page(page, server)

    wait_until(
        lambda: row_class(page, gpu.url, EMBED) and row_class(page, cpu.url, LLAMA), "both nodes' rows"
    )
    assert js(page, "return [...document.querySelectorAll('article.node')].map(n => n.dataset.node);") == [
        gpu.url,
        cpu.url,
    ]
    card = f'article.node[data-node="{gpu.url}"]'
    assert "Ollama 0.33.0-rc2" in text_of(page, card) and "online" in text_of(page, card)
    assert "at-gpu" in row_class(page, gpu.url, EMBED) and "at-cpu" in row_class(page, cpu.url, LLAMA)
    assert "★" in text_of(page, row(gpu.url, LLAMA))  # the priority model is marked
    wait_until(lambda: live(page), "the event stream connected")
    wait_until(
        lambda: text_of(page, f'figure.model-history[data-model="{LLAMA}"]'), "llama3.1's history chart"
    )
    assert js(page, f"""return document.querySelectorAll('figure[data-model="{LLAMA}"] svg text.row-label')
                        .length;""") == 2  # fmt: skip

    # through the control API, as another client would: the page follows the move's events
    moved = requests.post(
        server.url + "/flockparse/v1/force_cpu",
        json={"model": "mxbai-embed-large", "nodes": [gpu.url]},
        timeout=30,
    )
    assert moved.status_code == 200 and moved.json()[0]["result"]["success"] is True
    wait_until(lambda: "at-cpu" in (row_class(page, gpu.url, EMBED) or ""), "mxbai-embed-large shown on CPU")

    # behind the cluster's back: a client loads a model on the node itself; the health check sees it
    loaded = requests.post(cpu.url + "/api/generate", json={"model": SMALL, "prompt": ""}, timeout=30)
    assert loaded.status_code == 200
    wait_until(lambda: row_class(page, cpu.url, SMALL), "llama3.2:3b row on the CPU node")
    assert js(page, "return window.__sameDocument;") == "yes"  # no reload
    events = text_of(page, "#events")
    assert "mxbai-embed-large:latest now on CPU" in events or "moving mxbai-embed-large" in events

    desktop = screenshot(page, shots, "desktop", DESKTOP)
    phone = screenshot(page, shots, "phone", PHONE)
    assert desktop.stat().st_size > 10_000 and phone.stat().st_size > 10_000
    # readable on a phone: nothing wider than the screen but the statistics table, which scrolls itself
    assert js(page, "return document.documentElement.scrollWidth <= window.innerWidth;")


def test_a_button_moves_a_model_and_shows_the_reply(sim_node, serve_over, page) -> None:
    node = sim_node(vram_gb=24, preload=[("llama3.1", "cpu")], load_seconds_per_gb=0.15)
    server = serve_over([node])
    open_page(page, server)
    wait_until(lambda: "at-cpu" in (row_class(page, node.url, LLAMA) or ""), "llama3.1 shown on CPU")

    click(page, row(node.url, LLAMA) + ' button[data-action="force_gpu"]')
    # while the move runs (the load takes about a second): its buttons are disabled, it says so
    buttons = row(node.url, LLAMA) + " button"
    disabled = "return [...document.querySelectorAll(arguments[0])].every(b => b.disabled);"
    wait_until(lambda: js(page, disabled, buttons), "the row's buttons disabled while it moves")
    assert text_of(page, row(node.url, LLAMA) + " .result") == "moving to GPU…"

    wait_until(lambda: "ok" in result_class(page, node.url, LLAMA), "the move's result", timeout=30)
    shown = text_of(page, row(node.url, LLAMA) + " .result")
    assert shown.startswith(f"{LLAMA} now on GPU on {node.url}")  # the reply's message
    [held] = [m for m in node.loaded() if m["name"] == LLAMA]
    assert held["size_vram"] == held["size"]  # the simulator holds it on the GPU, all of it
    wait_until(lambda: "at-gpu" in (row_class(page, node.url, LLAMA) or ""), "llama3.1 shown on GPU")
    assert not js(page, "return [...document.querySelectorAll(arguments[0])].some(b => b.disabled);", buttons)

    click(page, row(node.url, LLAMA) + ' button[data-action="unload"]')
    wait_until(lambda: not node.loaded(), "the simulator unloaded llama3.1")
    wait_until(lambda: "not loaded" in (text_of(page, row(node.url, LLAMA)) or ""), "the row says not loaded")
    assert "unloaded" in text_of(page, row(node.url, LLAMA) + " .result")


def test_free_vram_unloads_what_is_not_a_priority_on_that_node(sim_node, serve_over, page) -> None:
    """The node's `Free VRAM` button is `cleanup` on that node: llama3.1 (the priority) stays."""
    small = "llama3.2:3b"
    node = sim_node(vram_gb=24, preload=[("llama3.1", "gpu"), (small, "gpu")])
    server = serve_over([node])
    open_page(page, server)
    wait_until(lambda: row_class(page, node.url, small) is not None, "llama3.2:3b shown")

    click(page, f'article[data-node="{node.url}"] button.cleanup')

    result = f'article[data-node="{node.url}"] .node-actions .result'
    wait_until(
        lambda: (
            "ok"
            in (
                js(
                    page,
                    "const r = document.querySelector(arguments[0]); return r ? r.className : '';",
                    result,
                )
                or ""
            )
        ),
        "the cleanup's result",
    )
    assert text_of(page, result) == f"unloaded {small}"
    assert [m["name"] for m in node.loaded()] == [LLAMA]
    wait_until(lambda: row_class(page, node.url, small) is None, "the row of the unloaded model gone")


def test_the_statistics_follow_requests_that_make_no_event(sim_node, serve_over, page) -> None:
    """Requests routed through the serve change no placement and send no event: the statistics are read
    again every few seconds while the page is shown."""
    node = sim_node(vram_gb=24, preload=[("llama3.1", "gpu")])
    server = serve_over([node])
    open_page(page, server)
    requests_cell = f'#stats tr[data-node="{node.url}"] td'
    wait_until(lambda: text_of(page, requests_cell) == "0", "the statistics shown")

    for _ in range(3):
        body = {"model": "llama3.1", "prompt": "hi", "stream": False}
        requests.post(server.url + "/api/generate", json=body, timeout=30).raise_for_status()

    wait_until(lambda: text_of(page, requests_cell) == "3", "three requests counted on the page", timeout=15)
    assert js(page, "return window.__sameDocument;") == "yes"


def test_the_token_form_on_a_serve_that_wants_a_token(sim_node, serve_over, page) -> None:
    node = sim_node(vram_gb=24, preload=[("llama3.1", "gpu")])
    server = serve_over([node], token=TOKEN, reads_need_token=True)
    open_page(page, server)
    wait_until(lambda: js(page, "return !document.getElementById('token-form').hidden;"), "the token form")
    assert not js(page, "return document.querySelectorAll('article.node').length;")  # nothing without it

    field = page.find_element("id", "token-input")
    field.send_keys("not-the-token")
    page.find_element("css selector", "#token-form button[type=submit]").click()
    wait_until(lambda: text_of(page, "#token-error") == "wrong token", "the form says the token is wrong")

    page.find_element("id", "token-input").send_keys(TOKEN)
    page.find_element("css selector", "#token-form button[type=submit]").click()
    wait_until(lambda: row_class(page, node.url, LLAMA), "the node once the token is given")
    wait_until(lambda: live(page), "the event stream with the token")
    assert js(page, "return document.getElementById('token-form').hidden;")
    assert js(page, "return sessionStorage.getItem('flockparse.token');") == TOKEN

    click(page, row(node.url, LLAMA) + ' button[data-action="force_cpu"]')
    wait_until(lambda: "ok" in result_class(page, node.url, LLAMA), "the move with the token")
    assert [m["size_vram"] for m in node.loaded()] == [0]


def test_a_nodes_text_with_markup_is_shown_as_text(sim_node, serve_over, page) -> None:
    image = "0.33.0-<img src=x onerror=__pwned=1>"  # a version is shown up to 40 characters
    script = "0.33.0<script>__pwned=2</script>"
    nodes = [sim_node(vram_gb=0, version=image), sim_node(vram_gb=0, version=script)]
    server = serve_over(nodes)
    open_page(page, server)
    for node, version in zip(nodes, (image, script), strict=True):
        badge = f'article.node[data-node="{node.url}"] .badge.version'
        wait_until(lambda b=badge: text_of(page, b), f"{node.url}'s version")
        assert text_of(page, badge) == f"Ollama {version}"
    assert js(page, "return document.querySelectorAll('main img, main script').length;") == 0
    assert js(page, "return window.__pwned === undefined;")


def test_services_without_history_leave_the_chart_a_line(sim_node, make_balancer, stop_at_end, page) -> None:
    node = sim_node(vram_gb=0)
    balancer = make_balancer([node.url])
    server = ServeThread(balancer, services=Services()).start()
    stop_at_end.insert(0, server)
    open_page(page, server)
    wait_until(lambda: "history_days = 0" in (text_of(page, "#history") or ""), "the history section's line")


def test_a_burst_of_events_is_read_in_a_few_coalesced_reads(
    sim_node, make_balancer, stop_at_end, page
) -> None:
    """100 events of one node within milliseconds: the page reads that node's report a few times, not 100
    times (events of 250 ms share one read), and the other node's only when it has an event."""
    quiet, busy = sim_node(vram_gb=0), sim_node(vram_gb=24, preload=[("llama3.1", "gpu")])
    balancer = make_balancer([quiet.url, busy.url])
    wait_until(lambda: all(s.online for s in balancer.node_states()), "first checks")
    server = ServeThread(balancer)
    reads: list[list[str]] = []

    @web.middleware
    async def count(request: web.Request, handler: Any) -> Any:
        if request.path.endswith("/vram_report"):
            reads.append(request.query.getall("node", []))
        return await handler(request)

    server.app.middlewares.append(count)
    stop_at_end.insert(0, server.start())
    open_page(page, server)
    wait_until(lambda: live(page) and row_class(page, busy.url, LLAMA), "the page live")
    reads.clear()
    for n in range(100):
        balancer.events.emit(Event("gpu_metrics_back", node=busy.url, message=f"burst {n}"))
    wait_until(lambda: "burst 99" in (text_of(page, "#events") or ""), "the burst's last event shown")
    # one event of the other node after the burst: its read comes after every read the burst asked for
    balancer.events.emit(Event("gpu_metrics_back", node=quiet.url, message="after the burst"))
    wait_until(lambda: any(quiet.url in nodes for nodes in reads), "the other node's read")
    assert 2 <= len(reads) <= 6, reads  # 101 events
    assert all(nodes == [busy.url] for nodes in reads[:-1]) and quiet.url in reads[-1], reads
