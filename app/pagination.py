"""Keyset pagination with opaque ``page_token`` cursors (AIP-158), newest first.

The cursor is the (created_at, id) of the last item returned, so pages stay stable while
new rows arrive, unlike offsets.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

from clipguard.app.problems import ProblemError
from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

MAX_PAGE_SIZE = 200


def _encode(created_at: datetime, row_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at.isoformat(), row_id]).encode()).decode()


def _decode(token: str) -> tuple[datetime, str]:
    """The cursor inside a token; anything this server could not have issued is a 400, never a 500.

    Converting to UTC here (as the column type will) catches dates that overflow on the way
    (``0001-01-01T00:00+14:00``), and a NUL byte would make PostgreSQL fail the query.
    """
    try:
        created, row_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        created, row_id = datetime.fromisoformat(created), str(row_id)
        created.astimezone(UTC)
        if "\x00" in row_id:
            raise ValueError("NUL byte in the row id")
        return created, row_id
    except (ValueError, TypeError, OverflowError) as exc:
        raise ProblemError(400, "page_token is not one this server issued", kind="bad-page-token") from exc


def paginate(session: Session, query: Select, table: Any, page_size: int, page_token: str | None) -> dict:
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ProblemError(422, f"page_size must be between 1 and {MAX_PAGE_SIZE}", kind="validation")
    if page_token:
        created, row_id = _decode(page_token)
        query = query.where(or_(table.created_at < created, and_(table.created_at == created, table.id < row_id)))
    rows = session.scalars(query.order_by(table.created_at.desc(), table.id.desc()).limit(page_size + 1)).all()
    more = len(rows) > page_size
    rows = rows[:page_size]
    return {"items": rows, "next_page_token": _encode(rows[-1].created_at, rows[-1].id) if more else None}
