"""The dashboard's routes: the page and its assets, each with the security headers (see the package)."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from flockparse.dashboard import DASHBOARD_PATH

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
ASSET_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",  # revalidated on each load: an upgrade's new assets are seen at once
}


def load_assets() -> dict[str, tuple[bytes, str]]:
    """file name -> (bytes, content type) of every asset in `static/`, read once (they are small)."""
    assets: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files("flockparse.dashboard").joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in ASSET_TYPES:
            assets[entry.name] = (entry.read_bytes(), ASSET_TYPES[suffix])
    return assets


def add_dashboard_routes(app: web.Application) -> None:
    """Serve the page at DASHBOARD_PATH (`/flockparse/dashboard` redirects there) and its assets beside it.
    Only the files shipped in `static/` are served: a name is a key of a dict, never a path."""
    assets = load_assets()

    def reply(name: str) -> web.Response:
        body, content_type = assets[name]
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=SECURITY_HEADERS)

    async def page(request: web.Request) -> web.Response:
        return reply("index.html")

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in assets:
            raise web.HTTPNotFound()
        return reply(name)

    async def slash(request: web.Request) -> web.Response:
        raise web.HTTPFound(DASHBOARD_PATH)

    app.router.add_get(DASHBOARD_PATH.rstrip("/"), slash)
    app.router.add_get(DASHBOARD_PATH, page)
    app.router.add_get(DASHBOARD_PATH + "{name}", asset)
