"""The browser console, served by the API under ``/ui``: no separate server and no build step.

Server-rendered pages (``templates/``), one plain script and one stylesheet (``static/``), and
the ``/v1`` API reached through a same-origin bridge. ``docs/console.md`` shows it.
"""

from __future__ import annotations

from clipguard.app.ui.pages import STATIC, router
from clipguard.app.ui.security import PREFIX, Console
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles


def install(app: FastAPI) -> None:
    """Add the console to ``app``; call it after the API's own middleware, so the bridge runs first."""
    app.include_router(router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=STATIC), name="ui-static")
    app.add_middleware(Console)
