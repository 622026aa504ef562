"""Run the review desk: bind the socket ourselves (clear errors, port 0 works), then hand it to uvicorn."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path

from pixelvote.errors import ConfigError
from pixelvote.review.settings import ReviewSettings

logger = logging.getLogger(__name__)


def review_url(settings: ReviewSettings, port: int | None = None) -> str:
    """The address to open in a browser (with ``?token=…`` when there is a token)."""
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    url = f"http://{host}:{settings.port if port is None else port}/"
    if settings.token is not None:
        url += "?token=" + settings.token.get_secret_value()
    return url


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; :class:`ConfigError` when that is impossible."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host!r} ({exc})", fix="pass --host 127.0.0.1") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc})",
                          fix="another program (or review desk) uses that port: pass another --port") from exc
    sock.set_inheritable(True)
    return sock


def serve(settings: ReviewSettings, *, announce: Callable[[str], object] | None = None) -> None:
    """Serve the review desk until interrupted (Ctrl+C). ``announce`` receives one line with the URL.

    Raises :class:`~pixelvote.errors.DataError` for an unusable output folder and
    :class:`~pixelvote.errors.ConfigError` when the address cannot be used.
    """
    import uvicorn

    from pixelvote.review.app import create_app

    app = create_app(settings)
    sock = bind(settings.host, settings.port)
    port = sock.getsockname()[1]
    line = f"review desk for {Path(settings.out_dir)} at {review_url(settings, port)} (Ctrl+C stops it)"
    (announce or logger.warning)(line)
    config = uvicorn.Config(app, log_level=settings.log_level, access_log=settings.log_level == "debug",
                            timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def run_review(out_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8765, reviewer: str | None = None,
               token: str | None = None, announce: Callable[[str], object] | None = None) -> None:
    """What ``pixelvote review OUT`` runs: validate the options, then :func:`serve`."""
    settings = ReviewSettings.build(out_dir=Path(out_dir), host=host, port=port, reviewer=reviewer,
                                    token=token)
    serve(settings, announce=announce)
