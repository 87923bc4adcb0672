"""The console's session, CSRF defence, tenant isolation and Content-Security-Policy, without a browser.

Requests are made the way a browser (or an attacker's page) would make them, against the in-process
app; the browser tests (test_console.py) show the same rules hold in Chromium.
"""

from __future__ import annotations

import re
from http.cookies import SimpleCookie

import pytest
from clipguard.app.auth import create_key, revoke_key
from clipguard.app.db import make_sessionmaker
from clipguard.app.ui.security import COOKIE

PAGES = ("/ui/jobs", "/ui/new", "/ui/jobs/0123456789abcdef")
EVIL = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}


@pytest.fixture
def new_key(settings):
    settings.ensure_dirs()
    sessions = make_sessionmaker(settings.database_url)
    return lambda tenant: create_key(sessions, tenant)


def sign_in(client, key: str) -> str:
    """Sign in; returns the CSRF token the signed-in pages carry."""
    r = client.post("/ui/login", data={"key": key}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return csrf_of(client.get("/ui/jobs").text)


def csrf_of(html: str) -> str:
    return re.search(r'<meta name="csrf-token" content="([^"]+)">', html).group(1)


def cookie_of(response) -> SimpleCookie:
    jar = SimpleCookie()
    jar.load(response.headers["set-cookie"])
    return jar


def test_pages_need_a_signed_in_session(client):
    for page in PAGES:
        r = client.get(page, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/ui/login", page
    assert client.get("/ui", follow_redirects=False).headers["location"] == "/ui/jobs"
    assert client.get("/ui/login").status_code == 200


def test_signing_in_keeps_the_key_in_an_httponly_strict_cookie_only(client, new_key):
    refused = client.post("/ui/login", data={"key": "cg_made-up"}, follow_redirects=False)
    assert refused.status_code == 401 and "not valid" in refused.text and "set-cookie" not in refused.headers

    key = new_key("acme")
    r = client.post("/ui/login", data={"key": key}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs" and key not in r.headers["location"]
    morsel = cookie_of(r)[COOKIE]
    assert morsel.value == key and morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/ui"
    assert not morsel["secure"]  # plain http here; over https the cookie is Secure (below)
    page = client.get("/ui/jobs")
    assert page.status_code == 200 and "acme" in page.text and key not in page.text


def test_over_https_the_session_cookie_is_secure(settings, new_key):
    from clipguard.app.main import create_app
    from fastapi.testclient import TestClient

    with TestClient(create_app(settings), base_url="https://console.example") as client:
        r = client.post("/ui/login", data={"key": new_key("acme")}, follow_redirects=False)
        assert cookie_of(r)[COOKIE]["secure"]


def test_a_sign_in_posted_from_another_site_is_refused(client, new_key):
    for headers in (EVIL, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "https://evil.example"}):
        r = client.post("/ui/login", data={"key": new_key("acme")}, headers=headers, follow_redirects=False)
        assert r.status_code == 403 and "set-cookie" not in r.headers, headers


def test_the_bridge_needs_a_session_and_a_csrf_token_bound_to_it(client, new_key):
    unsigned = client.get("/ui/api/v1/jobs")
    assert unsigned.status_code == 401 and unsigned.headers["content-type"] == "application/problem+json"

    other_token = sign_in(client, new_key("acme"))  # a token another session was given
    client.cookies.clear()
    token = sign_in(client, new_key("acme"))
    assert client.get("/ui/api/v1/jobs").status_code == 200  # reads need no token

    body = {"registered": "tiny"}  # an operator-registered dataset: a POST that creates something
    for headers in (
        {},
        {"X-CSRF-Token": "forged.0000"},
        {"X-CSRF-Token": other_token},
        {"X-CSRF-Token": token, **EVIL},
    ):
        r = client.post("/ui/api/v1/datasets", data=body, headers=headers)
        assert r.status_code == 403 and r.json()["type"] == "/problems/csrf", (headers, r.text)
    assert client.get("/ui/api/v1/datasets").json()["items"] == []  # nothing was created

    r = client.post("/ui/api/v1/datasets", data=body, headers={"X-CSRF-Token": token})
    assert r.status_code == 201 and r.json()["kind"] == "registered"
    assert client.get("/ui/api/v1/nothing-here").status_code == 404  # only /v1 is bridged


def test_the_bridge_acts_as_the_sessions_tenant_only(client, new_key, model_file):
    acme, globex = new_key("acme"), new_key("globex")
    with model_file.open("rb") as f:
        model = client.post(
            "/v1/models",
            headers={"Authorization": f"Bearer {acme}"},
            data={"arch": "small_cnn"},
            files={"file": (model_file.name, f)},
        ).json()
    sign_in(client, globex)
    # Another tenant's id answers as one that does not exist, even with acme's key sent beside the cookie.
    for headers in ({}, {"Authorization": f"Bearer {acme}"}):
        r = client.get(f"/ui/api/v1/models/{model['id']}", headers=headers)
        assert r.status_code == 404 and r.json()["detail"] == f"no model {model['id']}"
    assert client.get("/ui/api/v1/models").json()["items"] == []
    client.cookies.clear()
    sign_in(client, acme)
    assert client.get(f"/ui/api/v1/models/{model['id']}").json()["id"] == model["id"]


def test_revoking_the_key_ends_the_console_session(client, settings, new_key):
    key = new_key("acme")
    sign_in(client, key)
    revoke_key(make_sessionmaker(settings.database_url), key)
    assert client.get("/ui/jobs", follow_redirects=False).headers["location"] == "/ui/login"
    assert client.get("/ui/api/v1/jobs").status_code == 401


def test_signing_out_needs_the_token_and_clears_the_cookie(client, new_key):
    token = sign_in(client, new_key("acme"))
    assert client.post("/ui/logout", data={"csrf": "forged.0000"}, follow_redirects=False).status_code == 403
    r = client.post("/ui/logout", data={"csrf": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    assert cookie_of(r)[COOKIE]["max-age"] == "0"


def test_pages_have_a_strict_csp_and_no_inline_code(client, new_key):
    sign_in(client, new_key("acme"))
    for path in ("/ui/login", *PAGES):
        r = client.get(path)
        assert r.status_code == 200, path
        csp = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
        assert csp["script-src"] == "'self'" and csp["style-src"] == "'self'" and csp["default-src"] == "'none'"
        assert csp["frame-ancestors"] == "'none'" and csp["form-action"] == "'self'", path
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-store"
        # What the policy would block anyway must not be there: inline scripts, handlers, style attributes.
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", r.text), path
        assert not re.search(r"\son[a-z]+\s*=", r.text, re.I) and " style=" not in r.text, path
    script = client.get(re.search(r'<script src="([^"]+)"', client.get("/ui/jobs").text).group(1))
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert not re.search(r"\beval\(|new Function|innerHTML|insertAdjacentHTML|document\.write", script.text)


def test_answers_through_the_bridge_are_sandboxed(client, new_key):
    sign_in(client, new_key("acme"))
    r = client.get("/ui/api/v1/jobs")
    assert r.headers["content-security-policy"].startswith("sandbox;")
    assert "script-src" not in r.headers["content-security-policy"]  # default-src 'none': nothing runs
    assert r.headers["cache-control"] == "no-store"
