"""ASGI layers in front of the endpoints, and the JSON error answer they all use.

Order (outermost first): `ApiKey` (401), `Admission` (503 before an upload is read when the queue is
full or the model not loaded), `UploadLimit` (413 over --max-upload-mb, also for chunked bodies).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from fastapi.responses import JSONResponse

PROTECTED_PREFIXES = ("/v1/", "/api/")  # paths that need the API key when one is set


class ApiError(Exception):
    """An HTTP error answered as JSON {"error": short, "detail": what to do}."""

    def __init__(self, status: int, error: str, detail: str, headers: dict | None = None):
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


def error_response(
    status: int, error: str, detail: str, headers: dict | None = None
) -> JSONResponse:
    """The JSON answer of every error: {"error": short name, "detail": what to do}."""
    return JSONResponse({"error": error, "detail": detail}, status, headers=headers)


# --------------------------------------------------------------------------- ASGI middlewares
class UploadLimit:
    """413 for request bodies over `max_bytes`: from Content-Length, else counted while read.

    A body without Content-Length (chunked) is read here up to the limit and replayed to the app,
    so memory per request never exceeds the limit.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_large = error_response(
            413,
            "upload too large",
            f"the request body is over the server's limit of {self.max_bytes / 2**20:g} MB "
            "(--max-upload-mb); send a smaller file",
        )
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await too_large(scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
        body = b"".join(chunks)

        async def replay():
            nonlocal body
            message, body = {"type": "http.request", "body": body, "more_body": False}, b""
            return message

        return await self.app(scope, replay, send)


class ApiKey:
    """401 unless `Authorization: Bearer KEY` or `X-API-Key: KEY` on every /v1 and /api call."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if self.key is None or scope["type"] != "http" or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        if not scope["path"].startswith(PROTECTED_PREFIXES):
            return await self.app(scope, receive, send)  # the page and /docs hold no data
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key", b"").decode("latin-1")
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given or not secrets.compare_digest(given.encode(), self.key.encode()):
            response = error_response(
                401,
                "unauthorized",
                "this server needs its API key: send 'Authorization: Bearer KEY' or "
                "'X-API-Key: KEY' (the web page has a field for it)",
                headers={"WWW-Authenticate": "Bearer"},
            )
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class Admission:
    """503 for an inpaint request before its body is read when the queue is full or not ready.

    Under a burst, refusals then cost no upload parsing; the endpoint checks again (a race).
    """

    def __init__(self, app, check: Callable[[], None], paths: tuple[str, ...]):
        self.app, self.check, self.paths = app, check, paths  # check() raises ApiError

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            try:
                self.check()
            except ApiError as err:
                response = error_response(err.status, err.error, err.detail, err.headers)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)
