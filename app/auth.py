"""Bearer API keys: random 256-bit secrets, stored only as their sha256, each bound to a tenant.

A plain sha256 is enough (no slow KDF) because the keys are high-entropy random strings,
not passwords; the lookup by digest through a unique index leaks nothing useful by timing.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.db import ApiKey

KEY_PREFIX = "cg_"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(sessions: sessionmaker, tenant: str) -> str:
    """Store a new key for ``tenant`` and return it; this is the only time it exists in clear."""
    if not tenant.strip():
        raise ValueError("tenant name must not be empty")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with sessions.begin() as s:
        s.add(ApiKey(tenant=tenant.strip(), key_hash=digest(key)))
    return key


def tenant_for(s: Session, key: str) -> str | None:
    return s.scalar(select(ApiKey.tenant).where(ApiKey.key_hash == digest(key)))
