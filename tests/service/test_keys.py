"""API keys: ``clipguard keys revoke``, and revocation through the per-process key cache (``app.auth.KeyCache``).

The cache makes a known key cost no database round trip; these tests pin what it may not change:
a revocation in the API's own process is refused on the very next request, one made by another
process (the CLI) within ``KEY_CACHE_TTL_S``, and a lookup racing a revocation cannot re-cache the key.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from clipguard.app.auth import KeyCache, revoke_key, revoke_tenant
from clipguard.app.db import make_sessionmaker
from clipguard.app.main import create_app
from clipguard.app.settings import Settings
from fastapi.testclient import TestClient

from .test_api import assert_problem


def cli(settings: Settings, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CLIPGUARD_HOME": str(settings.home), "CLIPGUARD_DATABASE_URL": settings.database_url}
    return subprocess.run(
        [sys.executable, "-m", "clipguard.cli", "keys", *argv],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_revoke_one_key_or_a_whole_tenant(settings):
    settings.ensure_dirs()
    keys = [cli(settings, "create", "--tenant", tenant).stdout.strip() for tenant in ("acme", "acme", "acme", "globex")]
    assert all(k.startswith("cg_") for k in keys)
    with TestClient(create_app(settings.model_copy(update={"key_cache_ttl_s": 0}))) as client:
        assert all(client.get("/v1/jobs", headers=bearer(k)).status_code == 200 for k in keys)

        by_arg = cli(settings, "revoke", "--key", keys[0])
        assert by_arg.returncode == 0 and by_arg.stdout == "", by_arg.stderr
        by_stdin = cli(settings, "revoke", "--key", "-", stdin=keys[1] + "\n")  # kept out of ps and the history
        assert by_stdin.returncode == 0, by_stdin.stderr
        assert_problem(client.get("/v1/jobs", headers=bearer(keys[0])), 401)
        assert_problem(client.get("/v1/jobs", headers=bearer(keys[1])), 401)
        assert client.get("/v1/jobs", headers=bearer(keys[2])).status_code == 200

        again = cli(settings, "revoke", "--key", keys[0])  # a script must notice a key that matched nothing
        assert again.returncode == 1 and "no such key" in again.stderr
        tenant = cli(settings, "revoke", "--tenant", "acme")
        assert tenant.returncode == 0 and "revoked 1 key(s) of tenant 'acme'" in tenant.stderr
        assert_problem(client.get("/v1/jobs", headers=bearer(keys[2])), 401)
        assert client.get("/v1/jobs", headers=bearer(keys[3])).status_code == 200  # other tenants untouched
        assert cli(settings, "revoke", "--tenant", "acme").returncode == 1
    assert cli(settings, "revoke").returncode == 2  # --key or --tenant is required


def test_a_revocation_in_the_api_process_is_refused_at_once_though_the_key_is_cached(client, settings, key_for):
    sessions = make_sessionmaker(settings.database_url)
    one, tenant_key = key_for("acme"), key_for("initech")
    job = "0" * 32
    for headers in (one, tenant_key):  # both now cached (default TTL 5 s), through the status poll's route
        assert_problem(client.get(f"/v1/jobs/{job}", headers=headers), 404)
    assert revoke_key(sessions, one["Authorization"].removeprefix("Bearer "))
    assert revoke_tenant(sessions, "initech") == 1
    for headers in (one, tenant_key):
        assert_problem(client.get(f"/v1/jobs/{job}", headers=headers), 401)
        assert_problem(client.get("/v1/jobs", headers=headers), 401)


def test_a_key_revoked_by_another_process_is_refused_within_the_cache_ttl(settings):
    settings.ensure_dirs()
    key = cli(settings, "create", "--tenant", "acme").stdout.strip()
    with TestClient(create_app(settings.model_copy(update={"key_cache_ttl_s": 1.0}))) as client:
        assert client.get("/v1/jobs", headers=bearer(key)).status_code == 200  # looked up, now cached
        assert cli(settings, "revoke", "--key", key).returncode == 0  # the API process is not told
        revoked_at = time.monotonic()
        while client.get("/v1/jobs", headers=bearer(key)).status_code == 200:
            assert time.monotonic() - revoked_at < 1.5, "a revoked key outlived the cache TTL"
            time.sleep(0.05)
        assert_problem(client.get("/v1/jobs", headers=bearer(key)), 401)


def test_a_lookup_racing_a_revocation_cannot_cache_the_revoked_key():
    cache = KeyCache(ttl_s=60)
    generation = cache.generation  # the gate reads this, then looks the key up in a thread ...
    cache.forget(lambda digest, _tenant: digest == "d1")  # ... while the key is revoked
    cache.put("d1", "acme", generation)  # what the lookup read before the delete
    assert cache.get("d1") is None
    cache.put("d1", "acme", cache.generation)
    assert cache.get("d1") == "acme"
    off = KeyCache(ttl_s=0)  # 0 turns the cache off
    off.put("d1", "acme", off.generation)
    assert off.get("d1") is None
