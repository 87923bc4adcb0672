"""RFC 9457 ``application/problem+json`` for every error the API can answer, routing ones included."""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.schemas import Problem

MEDIA_TYPE = "application/problem+json"
log = logging.getLogger("clipguard.api")


class ProblemError(HTTPException):
    """Raised by routes; ``kind`` becomes the relative problem type ``/problems/<kind>``.

    It is an ``HTTPException`` so that FastAPI lets it through body parsing unchanged (a 413
    raised while a multipart body streams in would otherwise become a generic 400).
    """

    def __init__(self, status: int, detail: str, *, kind: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status, detail, headers)
        self.status, self.kind = status, kind


def problem_response(request: Request, status: int, detail: str | None, *, kind: str | None = None,
                     errors: list[dict] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = Problem(type=f"/problems/{kind}" if kind else "about:blank", title=HTTPStatus(status).phrase,
                   status=status, detail=detail, instance=request.url.path, errors=errors)
    return JSONResponse(jsonable_encoder(body, exclude_none=True), status_code=status, headers=headers,
                        media_type=MEDIA_TYPE)


def install(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(request, exc.status, exc.detail, kind=exc.kind, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if exc.detail != HTTPStatus(exc.status_code).phrase else None
        return problem_response(request, exc.status_code, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        detail = f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
        return problem_response(request, 422, detail, kind="validation", errors=errors)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(request, 500, "internal error; the server log has the details")


class BodyLimit:
    """Cap every request body at ``limit`` bytes, answering 413 as problem+json.

    FastAPI's own ``max_body_size`` answers a declared oversized ``Content-Length`` with a
    plain-text 413 that replaces any handler response, so the cap is kept here: a declared
    length over the cap is refused before a byte is read; an undeclared (chunked) body is
    counted as it arrives and aborted by an ``HTTPException`` that the problem handler renders.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = problem_response(Request(scope), 413, f"request body exceeds {self.limit} bytes",
                                        kind="upload-too-large")
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ProblemError(413, f"request body exceeds {self.limit} bytes", kind="upload-too-large")
            return message

        await self.app(scope, counted, send)
