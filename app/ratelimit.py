"""Per-API-key request rate limit: a fixed one-minute window, answered with 429 and ``Retry-After``.

The counting is the ``limits`` library's fixed-window strategy: one counter per key and
minute (``INCR`` + ``EXPIRE`` on Redis), the cheapest scheme that gives an exact
``Retry-After`` (the seconds left in the window). Its known edge, up to twice the limit in a
burst straddling two windows, is acceptable for a guard against runaway clients; it is not
a billing meter.

Where the counters live:

- Redis (``CLIPGUARD_RATELIMIT_URL``, or the broker URL when that is Redis): every API
  replica shares one count per key, so adding replicas does not multiply the allowance.
- in process (``memory://``, the default without Redis): right for the embedded
  single-process server.

Only authenticated keys are counted (the gate in ``clipguard.app.auth`` checks the key first), so a
flood of made-up keys creates no counters. When the counter store fails, requests are let
through and a warning is logged: a Redis restart must not take the read API down with it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from limits import RateLimitItemPerMinute
from limits.aio.storage import Storage
from limits.aio.strategies import FixedWindowRateLimiter
from limits.storage import storage_from_string

log = logging.getLogger("clipguard.api")
KEY_PREFIX = "clipguard:ratelimit"
STORE_TIMEOUT_S = 0.5
"""A counter store slower than this is treated as down (fail open) rather than delaying every request."""
WARN_EVERY_S = 60.0


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    limit: int
    retry_after_s: int = 0
    """Seconds until the window resets; only meaningful when not allowed."""


def storage_url(configured: str, broker_url: str) -> str:
    """The counter store: the configured URL, else the broker when it is Redis, else in-process memory."""
    url = configured or (broker_url if broker_url.startswith(("redis://", "rediss://")) else "memory://")
    return url if url.startswith("async+") else f"async+{url}"


class RateLimiter:
    """``per_minute`` requests per key and minute; 0 turns the limit off."""

    def __init__(self, per_minute: int, url: str, *, key_prefix: str = KEY_PREFIX) -> None:
        self.per_minute = per_minute
        self.url = url
        self._item = RateLimitItemPerMinute(max(per_minute, 1))
        options: dict = {"wrap_exceptions": True}
        if "redis" in url:
            options.update(
                implementation="redispy",
                key_prefix=key_prefix,
                socket_timeout=STORE_TIMEOUT_S,
                socket_connect_timeout=STORE_TIMEOUT_S,
            )
        self.storage: Storage = storage_from_string(url, **options)
        self._limiter = FixedWindowRateLimiter(self.storage)
        self._warned_at = -math.inf

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    async def hit(self, key_id: str) -> Verdict:
        """Count one request for ``key_id`` (a key digest, never the key itself)."""
        if not self.enabled:
            return Verdict(True, 0)
        try:
            if await self._limiter.hit(self._item, key_id):
                return Verdict(True, self.per_minute)
            stats = await self._limiter.get_window_stats(self._item, key_id)
        except Exception:  # the store is down or slow: serve rather than refuse everyone
            now = time.monotonic()
            if now - self._warned_at > WARN_EVERY_S:
                self._warned_at = now
                log.warning(
                    "rate-limit store %s unavailable; not limiting until it is back",
                    self.url.split("@")[-1],
                    exc_info=True,
                )
            return Verdict(True, self.per_minute)
        return Verdict(False, self.per_minute, max(1, math.ceil(stats.reset_time - time.time())))
