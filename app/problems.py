"""RFC 9457 ``application/problem+json`` for every error the API can answer, routing ones included."""

from __future__ import annotations

import logging
from http import HTTPStatus

from clipguard.app.schemas import Problem
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from python_multipart.multipart import parse_options_header
from sqlalchemy.exc import OperationalError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MEDIA_TYPE = "application/problem+json"
log = logging.getLogger("clipguard.api")
STORE_RETRY_AFTER_S = "5"


class ProblemError(HTTPException):
    """Raised by routes; ``kind`` becomes the relative problem type ``/problems/<kind>``.

    It is an ``HTTPException`` so that FastAPI lets it through body parsing unchanged (a 413
    raised while a multipart body streams in would otherwise become a generic 400).
    """

    def __init__(
        self, status: int, detail: str, *, kind: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status, detail, headers)
        self.status, self.kind = status, kind


def problem_response(
    request: Request,
    status: int,
    detail: str | None,
    *,
    kind: str | None = None,
    errors: list[dict] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = Problem(
        type=f"/problems/{kind}" if kind else "about:blank",
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=request.url.path,
        errors=errors,
    )
    return JSONResponse(
        jsonable_encoder(body, exclude_none=True), status_code=status, headers=headers, media_type=MEDIA_TYPE
    )


def error_response(request: Request, exc: ProblemError) -> JSONResponse:
    """The problem+json answer for a raised (or built) ``ProblemError``."""
    return problem_response(request, exc.status, exc.detail, kind=exc.kind, headers=exc.headers)


def store_unavailable(detail: str) -> ProblemError:
    """The job store (the database) did not answer: a 503 the client should retry, not a 500.

    Raised for a refused or dropped connection or a pool that has none to give; the request
    changed nothing, so retrying it later is safe.
    """
    return ProblemError(
        503, f"job store unavailable: {detail}", kind="store-unavailable", headers={"Retry-After": STORE_RETRY_AFTER_S}
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(OperationalError)
    async def _store(request: Request, exc: OperationalError) -> JSONResponse:
        log.warning("job store unavailable on %s %s: %s", request.method, request.url.path, exc.orig)
        return error_response(request, store_unavailable(type(exc.orig).__name__))

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if exc.detail != HTTPStatus(exc.status_code).phrase else None
        return problem_response(request, exc.status_code, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        detail = f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
        return problem_response(request, 422, detail, kind="validation", errors=errors)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(request, 500, "internal error; the server log has the details")


BUFFERED_BODY_LIMIT = 1024 * 1024
"""Cap on bodies the server reads into memory (JSON, url-encoded forms): far above any real job request."""


class BodyLimit:
    """Cap every request body, answering 413 as problem+json.

    Streamed uploads (a ``PUT`` body, written to disk as it arrives, and ``multipart/form-data``,
    which the form parser spools to disk) may reach ``limit``; any other body is read whole into
    memory by the framework, so it gets ``buffered_limit``: otherwise a 2 GB JSON body to
    ``POST /v1/jobs`` would take 2 GB of the API's memory.

    FastAPI's own ``max_body_size`` answers a declared oversized ``Content-Length`` with a
    plain-text 413 that replaces any handler response, so the cap is kept here: a declared
    length over the cap is refused before a byte is read; an undeclared (chunked) body is
    counted as it arrives and aborted by an ``HTTPException`` that the problem handler renders.
    """

    def __init__(self, app: ASGIApp, limit: int, buffered_limit: int = BUFFERED_BODY_LIMIT) -> None:
        self.app, self.limit, self.buffered_limit = app, limit, buffered_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        streamed = scope["method"] == "PUT" or headers.get("content-type", "").startswith("multipart/form-data")
        limit = self.limit if streamed else self.buffered_limit
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = problem_response(
                Request(scope), 413, f"request body exceeds {limit} bytes", kind="upload-too-large"
            )
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise ProblemError(413, f"request body exceeds {limit} bytes", kind="upload-too-large")
            return message

        await self.app(scope, counted, send)


class RequestGuard:
    """Refuse, as problem+json, two kinds of malformed request the framework would let through.

    - A NUL byte in the URL (``/v1/jobs/a%00b``, ``?model_id=%00``): PostgreSQL cannot hold one
      in a text value, so the lookup would fail with a 500; it is a 400 here instead.
    - A ``multipart/form-data`` body that ends before its closing boundary: Starlette's form
      parser (python-multipart) silently drops a part that a truncated body cut off, so an
      upload interrupted mid-file would register a model with no file (201) instead of
      failing. The stream is watched for the closing delimiter ``--boundary--`` (keeping only
      a boundary's length of it between chunks); a body that ends without it is a 400.
      Bodies without a boundary are left to the parser, which already answers 400 for them.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "\x00" in scope["path"] or b"%00" in scope["query_string"] or b"\x00" in scope["query_string"]:
            await problem_response(Request(scope), 400, "NUL bytes are not allowed in a URL", kind="malformed-url")(
                scope, receive, send
            )
            return
        media, params = parse_options_header(Headers(scope=scope).get("content-type", ""))
        boundary = params.get(b"boundary")
        if media != b"multipart/form-data" or not boundary:
            await self.app(scope, receive, send)
            return
        closing = b"--" + boundary + b"--"
        tail, complete = b"", False

        async def watched() -> Message:
            nonlocal tail, complete
            message = await receive()
            if message["type"] == "http.request":
                if not complete:
                    window = tail + message.get("body", b"")
                    complete = closing in window
                    tail = window[-len(closing) :]
                if not complete and not message.get("more_body", False):
                    raise ProblemError(
                        400,
                        "the multipart body ends before its closing boundary (truncated upload?)",
                        kind="malformed-multipart",
                    )
            return message

        await self.app(scope, watched, send)
