"""The review desk's FastAPI app: ``create_app(settings)`` with one router per resource.

Safety, outermost first: the ``Host`` header must be an allowed name (stops DNS-rebinding pages from
reaching a server on 127.0.0.1); with a token every request but ``/healthz`` must present it; request
bodies over ``max_body_bytes`` get 413; every response carries a strict Content-Security-Policy (the
page loads nothing from elsewhere). JSON bodies are only parsed with ``Content-Type: application/json``,
so a form on another site cannot post a decision.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pixelvote.errors import ConfigError, DataError
from pixelvote.review.endpoints import decisions, images, page, summary
from pixelvote.review.folder import OutsideFolderError, ReviewIndex
from pixelvote.review.settings import ReviewSettings
from pixelvote.review.store import ReviewStore

logger = logging.getLogger(__name__)

COOKIE = "pixelvote_review_token"
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


class Guard:
    """ASGI middleware: token check, request body limit, security headers."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body: int) -> None:
        self.app, self.token, self.max_body = app, token, max_body

    async def _reply(self, send: Send, status: int, detail: str, extra: dict[str, str] | None = None) -> None:
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.encode(), v.encode()) for k, v in {**SECURITY_HEADERS, **(extra or {})}.items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _presented(self, scope: Scope) -> str | None:
        h = Headers(scope=scope)
        auth = h.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        if h.get("x-review-token"):
            return h["x-review-token"]
        cookie: SimpleCookie = SimpleCookie()
        try:
            cookie.load(h.get("cookie", ""))
        except Exception:
            return None
        return cookie[COOKIE].value if COOKIE in cookie else None

    def _ok(self, given: str | None) -> bool:
        return given is not None and self.token is not None and secrets.compare_digest(
            given.encode(), self.token.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.token is not None and scope["path"] != "/healthz" and not self._ok(self._presented(scope)):
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if scope["path"] == "/" and self._ok((query.get("token") or [None])[0]):
                cookie = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                await send({"type": "http.response.start", "status": 303,
                            "headers": [(b"location", b"/"), (b"set-cookie", cookie.encode()),
                                        (b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b""})
                return
            await self._reply(send, 401, "this review desk needs its token: open the address that "
                              "`pixelvote review` printed (…/?token=…), or send "
                              "'Authorization: Bearer TOKEN'", {"www-authenticate": "Bearer"})
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await self._reply(send, 413, f"request body over the limit of {self.max_body} bytes")
            return
        received, started, refused = 0, False, False

        async def limited_receive() -> Message:
            # a body without Content-Length (chunked) is counted as it arrives; over the limit, answer
            # 413 now and tell the app the client left, so it stops reading
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    refused = True
                    if not started:
                        await self._reply(send, 413, f"request body over the limit of {self.max_body} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 is already sent
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    if k not in headers:
                        headers[k] = v
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_headers)
        except Exception:
            if not refused:
                raise


def create_app(settings: ReviewSettings) -> FastAPI:
    """The review app for ``settings.out_dir``; opens (and creates) ``settings.database`` now.

    Raises :class:`~pixelvote.errors.DataError` when the output folder or the database cannot be used.
    """
    index = ReviewIndex(settings.out_dir)
    store = ReviewStore(settings.database)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logger.info("review desk on %s: %d images, database %s", index.root, len(index.records),
                    settings.database)
        try:
            yield
        finally:
            store.close()

    app = FastAPI(title="pixelvote review desk", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.state.settings, app.state.index, app.state.store = settings, index, store
    for router in (summary.router, images.router, decisions.router, page.router):
        app.include_router(router)

    @app.exception_handler(OutsideFolderError)
    async def _outside(request: Request, exc: OutsideFolderError) -> JSONResponse:
        logger.warning("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": str(exc)}, status_code=403)

    @app.exception_handler(DataError)
    async def _data(request: Request, exc: DataError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(ConfigError)
    async def _config(request: Request, exc: ConfigError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    token = settings.token.get_secret_value() if settings.token is not None else None
    app.add_middleware(Guard, token=token, max_body=settings.max_body_bytes)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.hosts, www_redirect=False)
    return app
