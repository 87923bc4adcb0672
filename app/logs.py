"""Logging for the API and the workers: one JSON object per line, with the job id on every line a job causes.

``CLIPGUARD_LOG_FORMAT=json`` (what the image and the compose file set) writes each record as one JSON
object (python-json-logger) with ``timestamp``, ``level``, ``logger``, ``message``, ``process`` and
``job_id``; ``text`` (the default, for a terminal) writes the same fields as a plain line.

The job id travels in a :class:`contextvars.ContextVar`, not through arguments, so the engine's and the
libraries' own log calls get it too:

* the worker's purify task binds it around the whole attempt (:func:`job_context`);
* the API's :class:`JobContext` middleware binds it for every request under ``/v1/jobs/{id}`` and, for
  ``POST /v1/jobs``, from the ``Location`` of the response, so uvicorn's access line carries it as well;
* Celery's own task lines (``received``, ``succeeded``, ``failed``, ``retry``) are written by the worker's
  main process, or after the task returned: :class:`JobIdFilter` reads the job id from the task's
  argument, which for the purify task is the job id and nothing else.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import functools
import inspect
import logging
import re
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Literal, ParamSpec, TypeVar

from clipguard.app.queues import PURIFY_TASK
from pythonjsonlogger.json import JsonFormatter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LogFormat = Literal["json", "text"]

job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("clipguard_job_id", default=None)

_JOB_PATH = re.compile(r"^/v1/jobs/([0-9a-f]{32})(?:[/:]|$)")
_HANDLER_NAME = "clipguard"
_RESERVED = [*vars(logging.LogRecord("", 0, "", 0, "", None, None)), "message", "asctime", "color_message"]
"""Record attributes that are not extra fields (``color_message`` is uvicorn's colored duplicate)."""
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] job=%(job_id)s %(message)s"


@contextlib.contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Every record logged inside the block, from any logger, carries ``job_id``."""
    token = job_id_var.set(job_id)
    try:
        yield
    finally:
        job_id_var.reset(token)


class JobIdFilter(logging.Filter):
    """Adds ``record.job_id``: the bound job, or the purify task's argument on Celery's task lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id_var.get() or _job_from_celery(record)
        return True


def _job_from_celery(record: logging.LogRecord) -> str | None:
    # celery.app.trace and celery.worker.strategy pass the task's context as `extra={"data": ...}`
    data = getattr(record, "data", None)
    if not isinstance(data, dict) or data.get("name") != PURIFY_TASK:
        return None
    try:
        args = ast.literal_eval(str(data.get("args")))
    except (ValueError, SyntaxError):
        return None
    return args[0] if isinstance(args, list | tuple) and args and isinstance(args[0], str) else None


def _json_default(value: object) -> str:
    """ISO 8601 timestamps (``2026-11-24T15:37:38.750+00:00``); anything else JSON lacks as its ``str``."""
    return value.isoformat() if isinstance(value, datetime) else str(value)


def formatter(fmt: LogFormat) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter(
            ["levelname", "name", "message", "process"],
            timestamp=True,
            rename_fields={"levelname": "level", "name": "logger"},
            reserved_attrs=_RESERVED,
            json_default=_json_default,
        )
    return logging.Formatter(TEXT_FORMAT)


def configure(fmt: LogFormat = "text", level: int | str = logging.INFO) -> None:
    """Send every record (root, uvicorn's and Celery's loggers, ``warnings``) to one stderr handler.

    Idempotent: called again (the API's lifespan after uvicorn configured its loggers, a forked
    worker child) it replaces its own handler instead of adding a second one.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter(fmt))
    handler.addFilter(JobIdFilter())
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if h.get_name() != _HANDLER_NAME] + [handler]
    root.setLevel(level)
    # uvicorn installs its own handlers and stops propagation; route its lines through ours instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task", "celery.redirected"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    logging.captureWarnings(True)


class JobContext:
    """ASGI middleware binding the job id of ``/v1/jobs/{id}…`` requests (and of a created job's
    ``Location``) for everything logged while the request runs, uvicorn's access line included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        match = _JOB_PATH.match(scope.get("path", ""))
        token = job_id_var.set(match.group(1) if match else None)
        if match:  # the id is known: no need to watch the response for a Location (a hop per message saved)
            try:
                await self.app(scope, receive, send)
            finally:
                job_id_var.reset(token)
            return

        async def bind_created(message: Message) -> None:
            if message["type"] == "http.response.start" and job_id_var.get() is None:
                location = dict(message.get("headers", [])).get(b"location", b"").decode("latin-1")
                if created := _JOB_PATH.match(location):
                    job_id_var.set(created.group(1))  # undone with the reset below
            await send(message)

        try:
            await self.app(scope, receive, bind_created)
        finally:
            job_id_var.reset(token)


P = ParamSpec("P")
R = TypeVar("R")


def binds_job(func: Callable[P, R]) -> Callable[P, R]:
    """Run ``func`` with its ``job_id`` argument bound, so everything it logs carries the job id.

    A decorator rather than a ``with`` block so a function shared with others gains it in one line.
    """
    signature = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        job_id = signature.bind_partial(*args, **kwargs).arguments.get("job_id")
        if not isinstance(job_id, str):
            return func(*args, **kwargs)
        with job_context(job_id):
            return func(*args, **kwargs)

    return wrapper
