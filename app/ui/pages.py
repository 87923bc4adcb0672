"""The console's pages: sign-in, jobs (with the tenant's models and datasets), a new job, one job.

Pages are Jinja2 templates (autoescaped) rendered on the server; their data comes from the
``/v1`` API through the bridge (``clipguard.app.ui.security``), read and written by ``static/console.js``.
A page needs a signed-in session; without one it redirects to the sign-in page.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any

from clipguard.app.auth import digest, tenant_of
from clipguard.app.ui.security import PREFIX, cookie_header, csrf_ok, csrf_token, same_origin, session_key
from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from clipguard.methods import METHOD_HELP, Granularity, Method

HERE = Path(__file__).parent
STATIC = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")
ARCHITECTURES = ("small_cnn", "resnet18", "preact_resnet18", "vgg16_bn")
"""Suggestions in the architecture field (the registry needs torch, which the API process does not import);
any registry name or ``torchvision:<name>`` may be typed, the quarantine checks it."""

router = APIRouter(prefix=PREFIX, include_in_schema=False)


def _fingerprint(name: str) -> str:
    return hashlib.sha256((STATIC / name).read_bytes()).hexdigest()[:12]


_VERSIONS = {p.name: _fingerprint(p.name) for p in STATIC.iterdir() if p.is_file()}


def static_url(name: str) -> str:
    """The file's URL with its content hash, so a browser never runs a stale script against a new page."""
    return f"{PREFIX}/static/{name}?v={_VERSIONS[name]}"


async def _session(request: Request) -> tuple[str, str] | None:
    """(key, tenant) of the signed-in session, or None when there is none or the key was revoked."""
    key = session_key(request.headers)
    if key is None:
        return None
    tenant = await tenant_of(request.app.state, digest(key))
    return (key, tenant) if tenant is not None else None


def _render(
    request: Request, template: str, page: str, session: tuple[str, str] | None, *, status: int = 200, **context: Any
) -> HTMLResponse:
    key, tenant = session if session else (None, None)
    settings = request.app.state.settings
    response = templates.TemplateResponse(
        request,
        template,
        status_code=status,
        context={
            "page": page,
            "tenant": tenant,
            "csrf": csrf_token(key) if key else None,
            "static": static_url,
            "max_upload": settings.max_upload_bytes,
            **context,
        },
    )
    response.headers["cache-control"] = "no-store"
    return response


def _to_login() -> RedirectResponse:
    return RedirectResponse(f"{PREFIX}/login", status_code=303)


@router.get("")
@router.get("/")
async def home() -> Response:
    return RedirectResponse(f"{PREFIX}/jobs", status_code=303)


@router.get("/login")
async def login_page(request: Request) -> Response:
    if await _session(request):
        return RedirectResponse(f"{PREFIX}/jobs", status_code=303)
    return _render(request, "login.html", "login", None)


@router.post("/login")
async def login(request: Request, key: Annotated[str, Form(max_length=500)] = "") -> Response:
    """Check the pasted key and keep it in the session cookie; a wrong key re-renders the form with the reason."""
    if not same_origin(request.headers):
        return _render(
            request,
            "login.html",
            "login",
            None,
            status=403,
            error="This sign-in did not come from the console's own page.",
        )
    key = key.strip()
    session = (key, await tenant_of(request.app.state, digest(key))) if key else None
    if session is None or session[1] is None:
        return _render(
            request,
            "login.html",
            "login",
            None,
            status=401,
            error="That API key is not valid: it is unknown or was revoked.",
        )
    response = RedirectResponse(f"{PREFIX}/jobs", status_code=303)
    response.headers["set-cookie"] = cookie_header(key, secure=request.url.scheme == "https")
    return response


@router.post("/logout")
async def logout(request: Request, csrf: Annotated[str, Form(max_length=500)] = "") -> Response:
    key = session_key(request.headers)
    if key is not None and not (same_origin(request.headers) and csrf_ok(key, csrf)):
        return Response("invalid CSRF token; reload the page", status_code=403, media_type="text/plain")
    response = _to_login()
    response.headers["set-cookie"] = cookie_header(None, secure=request.url.scheme == "https")
    return response


@router.get("/jobs")
async def jobs_page(request: Request) -> Response:
    session = await _session(request)
    return _render(request, "jobs.html", "jobs", session) if session else _to_login()


@router.get("/new")
async def new_job_page(request: Request) -> Response:
    session = await _session(request)
    if not session:
        return _to_login()
    return _render(
        request,
        "new.html",
        "new",
        session,
        architectures=ARCHITECTURES,
        methods=[m.value for m in Method],
        method_help={m.value: text for m, text in METHOD_HELP.items()},
        granularities=[g.value for g in Granularity],
    )


@router.get("/jobs/{job_id}")
async def job_page(request: Request, job_id: str) -> Response:
    session = await _session(request)
    if not session:
        return _to_login()
    settings = request.app.state.settings
    # With S3 storage an artifact is a redirect to the bucket, whose answer says "attachment": a link, not a frame.
    return _render(request, "job.html", "job", session, job_id=job_id, embed_report=not settings.storage_url)
