"""The playground: a page in the browser over the gateway's HTTP API, served by the gateway itself.

Its files (gateway/static: HTML, one script, one stylesheet; no build step, no CDN) are read
once and answered from memory, so the page works on a cluster with no internet. The page only
calls the HTTP API, with the caller's API key when keys are on; its routes stay open, as a page
must load before it can ask for a key. A Content-Security-Policy keeps it to its own files and
this origin: no inline script, no third-party anything.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

# path -> (file in gateway/static, content type)
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/playground/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
    "/playground/playground.css": ("playground.css", "text/css; charset=utf-8"),
}
OPEN_PAGE_ROUTES = frozenset((method, path) for path in PAGE_FILES for method in ("GET", "HEAD"))
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)


def _route(path: str, name: str, content_type: str) -> Route:
    body = resources.files("gateway").joinpath("static", name).read_bytes()
    headers = {
        "Content-Type": content_type,
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",  # revalidated: a new release's page is picked up at once
    }

    async def answer(request: Request) -> Response:
        # Mounted below a prefix (a Ray Serve route prefix), the page's files are there too; the
        # script finds the API next to itself.
        root = request.scope.get("root_path", "").rstrip("/")
        if root and name == "index.html":
            return Response(body.replace(b'"/playground/', f'"{root}/playground/'.encode()), headers=headers)
        return Response(body, headers=headers)

    return Route(path, answer, methods=["GET", "HEAD"])


def page_routes() -> list[BaseRoute]:
    return [_route(path, name, content_type) for path, (name, content_type) in PAGE_FILES.items()]
