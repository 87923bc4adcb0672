"""The published OpenAPI document, with every error answer typed as ``application/problem+json``.

FastAPI documents a route's ``responses={409: ...}`` without a body, and adds to every route with
parameters a 422 whose schema (``HTTPValidationError``) this API never sends: ``clipguard.app.problems``
answers every error, routing and validation ones included, as RFC 9457 problem details. The
errors every route can meet (a malformed URL, a missing key, the rate limit, the job store down,
an internal error) are not declared per route at all. :func:`problem_typed` fixes the generated
document in one place, so a route added later is covered without remembering to declare them;
``tests/service/test_openapi.py`` walks the result and fails on any error answer left untyped.

``python -m clipguard.app.openapi`` prints the document; ``docs/openapi.json`` is that output, kept current
by the same test.
"""

from __future__ import annotations

import json
from typing import Any

from clipguard.app.auth import PROTECTED_PREFIX
from clipguard.app.problems import MEDIA_TYPE
from clipguard.app.schemas import Problem
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

PROBLEM_REF = "#/components/schemas/Problem"
EVERY_ROUTE = {
    "400": "malformed request: a NUL byte in the URL, a multipart body cut short or unparsable, or a page token "
    "this server did not issue",
    "500": "internal error; the server log has the details",
}
PROTECTED = {
    "401": "missing, unknown or revoked API key (`WWW-Authenticate: Bearer`)",
    "429": "over the per-key rate limit; retry after `Retry-After` seconds",
    "503": "the job store (database) or object storage is unavailable; nothing changed, retry after `Retry-After`",
}
WITH_PATH_ID = {"404": "no such resource, or another tenant's (the same answer)"}
WITH_INPUT = {"422": "invalid parameters or body: `errors[]` lists each field (`loc`, `msg`, `type`)"}
WITH_BODY = {"413": "request body over the limit (uploads: `MAX_UPLOAD_BYTES`; any other body: 1 MiB)"}
UNUSED_SCHEMAS = ("HTTPValidationError", "ValidationError")


def problem_typed(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with the common error answers declared and every 4xx/5xx answer's body a ``Problem``."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name in UNUSED_SCHEMAS:
        schemas.pop(name, None)
    schemas["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            params = operation.get("parameters", [])
            declared = dict(EVERY_ROUTE)
            if path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/"):
                declared |= PROTECTED
            if any(p.get("in") == "path" for p in params):
                declared |= WITH_PATH_ID
            if params or "requestBody" in operation:
                declared |= WITH_INPUT
            if "requestBody" in operation:
                declared |= WITH_BODY
            responses = operation.setdefault("responses", {})
            for code, description in declared.items():
                responses.setdefault(code, {"description": description})
            if "422" in responses and responses["422"].get("description") == "Validation Error":
                responses["422"]["description"] = WITH_INPUT["422"]
            for code, response in responses.items():
                if code[0] in "45":
                    response["content"] = {MEDIA_TYPE: {"schema": {"$ref": PROBLEM_REF}}}
    return document


def install(app: FastAPI) -> None:
    """Serve :func:`problem_typed`'s version of the app's document at ``/openapi.json`` (built once)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = problem_typed(
                get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def render(app: FastAPI) -> str:
    """The document as committed in ``docs/openapi.json``."""
    return json.dumps(app.openapi(), indent=2, ensure_ascii=False, sort_keys=False) + "\n"


if __name__ == "__main__":
    import tempfile

    from clipguard.app.main import create_app
    from clipguard.app.settings import Settings

    with tempfile.TemporaryDirectory() as home:
        print(render(create_app(Settings(home=home))), end="")
