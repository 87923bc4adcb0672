"""The published OpenAPI document is complete: every error answer typed as problem+json, enums spelled out.

Walks the document the API serves, so a route added without its errors, or a closed set of values
left as a plain string, fails here. docs/openapi.json (linked from docs/api.md) must be the same
document: regenerate it with ``python -m clipguard.app.openapi > docs/openapi.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clipguard.app.main import create_app
from clipguard.app.openapi import PROBLEM_REF, render

DOCS = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
METHODS = ("get", "put", "post", "delete", "patch")


@pytest.fixture
def document(client) -> dict:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def operations(document: dict):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


def test_every_error_answer_is_typed_as_problem_json(document):
    assert document["components"]["schemas"]["Problem"]["required"] == ["title", "status"]
    seen = 0
    for path, method, operation in operations(document):
        responses = operation["responses"]
        where = f"{method.upper()} {path}"
        errors = {code: r for code, r in responses.items() if code[0] in "45"}
        expected = {"400", "500"}
        if path.startswith("/v1"):
            expected |= {"401", "429", "503"}
        if "{" in path:
            expected.add("404")
        if operation.get("parameters") or "requestBody" in operation:
            expected.add("422")
        if "requestBody" in operation:
            expected.add("413")
        assert expected <= set(errors), f"{where} does not declare {sorted(expected - set(errors))}"
        for code, response in errors.items():
            assert response["content"] == {"application/problem+json": {"schema": {"$ref": PROBLEM_REF}}}, (
                f"{where} {code}: {response.get('content')}"
            )
            assert response["description"] and response["description"] != "Validation Error", f"{where} {code}"
        seen += 1
    assert seen >= 14  # every route, not an empty walk
    text = json.dumps(document)
    assert "HTTPValidationError" not in text and "/ui" not in document["paths"]


def test_closed_sets_of_values_are_enums(document):
    schemas = document["components"]["schemas"]

    def enum(schema: dict) -> set:
        if "$ref" in schema:  # an enum of its own, as Method and Granularity are
            return enum(schemas[schema["$ref"].rsplit("/", 1)[-1]])
        options = schema.get("anyOf", [schema])
        return {v for o in options for v in o.get("enum", [o["const"]] if "const" in o else [])}

    assert enum(schemas["JobOut"]["properties"]["state"]) == {"queued", "running", "succeeded", "failed", "cancelled"}
    assert enum(schemas["ModelOut"]["properties"]["status"]) == {"awaiting_upload", "validating", "ready", "rejected"}
    assert enum(schemas["DatasetOut"]["properties"]["kind"]) == {"upload", "path", "registered"}
    assert enum(schemas["JobCreate"]["properties"]["method"]) == {"guard", "paper"}
    assert enum(schemas["JobCreate"]["properties"]["granularity"]) == {"channel", "element"}
    assert "auto" in enum(schemas["JobCreate"]["properties"]["lam"])
    query = {(path, p["name"]): p["schema"] for path, _, op in operations(document) for p in op.get("parameters", [])}
    assert enum(query[("/v1/jobs", "state")]) == {"queued", "running", "succeeded", "failed", "cancelled"}
    assert enum(query[("/v1/models", "status")]) == {"awaiting_upload", "validating", "ready", "rejected"}


def test_docs_carry_the_served_document(settings, document):
    assert DOCS.is_file(), "docs/openapi.json is missing: python -m clipguard.app.openapi > docs/openapi.json"
    assert json.loads(DOCS.read_text()) == document, "stale: python -m clipguard.app.openapi > docs/openapi.json"
    assert render(create_app(settings)) == DOCS.read_text()  # byte for byte, as the command writes it
