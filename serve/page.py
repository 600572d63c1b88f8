"""`cli.py serve`: a local search page and JSON API over one run's pool.

One `Searcher` (run, pool, backbone, index) answers every request: text -> images, image ->
captions and image -> similar images, filtered by split, modality and named concept, paged. New
text and uploaded images are encoded with the run's own backbone, exactly as `cli.py search` does.

What a request can reach is bounded by construction: an image is addressed by its position in the
pool (`split:row`) and its bytes are read from the location the cache recorded for that row, under
the data folder's rule (`extract.access`: never a file outside it), so no path from a request ever
reaches the file system; uploads are capped in bytes while they stream in
(nothing past the cap is read off the connection, held or spooled) and in pixels (the extractor's
decompression-bomb check); every refusal is a 4xx with a one-line reason, in the API's own terms
(query parameters, never the command line's flags).

The app is built here; its parts live beside it: the handlers (`page_routes`), the parameters and
checks they share (`page_requests`), uploads (`page_upload`), pool keys and filters (`page_pool`)
and refusals (`page_errors`).
"""
from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from medembed.common.errors import BadOption
from medembed.common.modalities import DEFAULT_MODALITIES
from medembed.serve.page_errors import answer_errors_in_one_line
from medembed.serve.page_pool import PagePool
from medembed.serve.page_requests import PageState, ServeLimits
from medembed.serve.page_routes import STATIC, add_page_routes
from medembed.serve.search import Searcher

__all__ = ["ServeLimits", "ServeOptions", "create_app", "listen", "serve"]


@dataclass(frozen=True)
class ServeOptions:
    """Where `cli.py serve` listens unless told: an address only this machine reaches, so a page over
    a run's pool is never exposed by default."""

    host: str = "127.0.0.1"
    port: int = 8000


def create_app(searcher: Searcher, limits: ServeLimits | None = None) -> FastAPI:
    """The app: the page at /, the JSON API under /api. Built once per served run, which its
    handlers read from `app.state.page`."""
    app = FastAPI(title="medembed search", docs_url=None, redoc_url=None)
    app.state.page = PageState(searcher, PagePool(searcher, DEFAULT_MODALITIES), limits or ServeLimits())
    answer_errors_in_one_line(app)
    add_page_routes(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on (host, port), for `serve`. `cli.py serve` opens it before loading the model,
    so a busy port is one line at once instead of an error after the loading, and no other process can
    take the port meanwhile (connections wait in the backlog until the page answers). Refusals are a
    BadOption of one line naming the flag to change."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise BadOption(_listen_refusal(e, host, port)) from None
    return sock


def _listen_refusal(e: OSError, host: str, port: int) -> str:
    if e.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is in use; choose another with --port"
    if e.errno == errno.EACCES:
        return f"port {port} on {host}: permission denied (ports below 1024 need privileges); choose another with --port"
    return f"cannot listen on {host} port {port}: {e.strerror or e}; choose another --host or --port"


def serve(searcher: Searcher, host: str = ServeOptions.host, port: int = ServeOptions.port,
          limits: ServeLimits | None = None, sock: socket.socket | None = None) -> None:
    """Run the page until interrupted (uvicorn, one process) on `sock` from `listen`, opened here when not
    given; the socket is closed on return."""
    import uvicorn

    if sock is None:
        sock = listen(host, port)
    server = uvicorn.Server(uvicorn.Config(create_app(searcher, limits), log_level="warning"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
