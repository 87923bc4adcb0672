"""Request dependencies: the settings, a database session, the caller's tenant, the broker."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from clipguard.app.auth import tenant_for
from clipguard.app.problems import ProblemError
from clipguard.app.settings import Settings
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

_bearer = HTTPBearer(auto_error=False, description="an API key from `clipguard keys create`")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_sessions(request: Request) -> sessionmaker:
    return request.app.state.sessions


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


def get_tenant(
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The caller's tenant: found by ``clipguard.app.auth.Gate`` (before the body was read), else looked up here.

    The fallback keeps a route safe even if it is mounted where the gate does not run.
    """
    tenant = getattr(request.state, "tenant", None)
    if tenant is None and credentials:
        tenant = tenant_for(session, credentials.credentials)
    if tenant is None:
        raise ProblemError(
            401,
            "missing or unknown API key; send `Authorization: Bearer <key>`",
            kind="unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return tenant


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
SessionsDep = Annotated[sessionmaker, Depends(get_sessions)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
TenantDep = Annotated[str, Depends(get_tenant)]
