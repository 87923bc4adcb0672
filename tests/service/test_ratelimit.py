"""Per-key rate limit: 429 problem+json with Retry-After, per key, shared by replicas through real Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from clipguard.app.main import create_app
from clipguard.app.ratelimit import KEY_PREFIX, storage_url
from fastapi.testclient import TestClient

from .conftest import redis_db_url
from .test_api import assert_problem

LIMIT_DB_URL = redis_db_url(12)
"""A Redis db number of its own (conftest uses 11, observability 13 and 15, S3 14), emptied of our keys afterwards."""


@pytest.fixture(autouse=True)
def _home(settings) -> None:
    settings.ensure_dirs()  # before key_for opens the store; these tests build their own apps


@pytest.fixture
def limit_redis(redis_url) -> Iterator[redis.Redis]:  # redis_url: makes sure the server runs
    client = redis.Redis.from_url(LIMIT_DB_URL)
    yield client
    for key in client.scan_iter(f"{KEY_PREFIX}*"):
        client.delete(key)
    client.close()


def limited(settings, per_minute: int, url: str):
    return settings.model_copy(update={"rate_limit_per_minute": per_minute, "ratelimit_url": url})


def test_a_key_over_its_limit_gets_429_with_retry_after_and_others_do_not(settings, key_for):
    with TestClient(create_app(limited(settings, 3, "memory://"))) as client:
        acme, globex = key_for("acme"), key_for("globex")
        assert [client.get("/v1/jobs", headers=acme).status_code for _ in range(3)] == [200] * 3
        r = client.get("/v1/jobs", headers=acme)
        body = assert_problem(r, 429)
        assert body["type"] == "/problems/rate-limited" and "3 requests a minute" in body["detail"]
        assert 1 <= int(r.headers["retry-after"]) <= 60
        # Uploads are refused too, before their body is read.
        assert_problem(client.post("/v1/datasets", headers=acme, files={"file": ("d.npz", b"x" * 1000)}), 429)
        assert client.get("/v1/jobs", headers=globex).status_code == 200  # another key: its own count
        assert_problem(client.get("/v1/jobs"), 401)  # no key: refused as such, never counted
        assert client.get("/healthz").status_code == 200  # ops endpoints are not limited


def test_zero_turns_the_limit_off(settings, auth):
    with TestClient(create_app(limited(settings, 0, "memory://"))) as client:
        assert {client.get("/v1/jobs", headers=auth).status_code for _ in range(20)} == {200}


def test_replicas_share_one_count_in_redis(settings, key_for, limit_redis):
    """Two API instances (replicas) on one Redis: the key's allowance is shared, not doubled."""
    config = limited(settings, 4, LIMIT_DB_URL)
    auth = key_for("acme")
    with TestClient(create_app(config)) as one, TestClient(create_app(config)) as two:
        assert [c.get("/v1/jobs", headers=auth).status_code for c in (one, two, one, two)] == [200] * 4
        assert_problem(one.get("/v1/jobs", headers=auth), 429)
        r = two.get("/v1/jobs", headers=auth)
        assert_problem(r, 429)
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert client_count(limit_redis) == 1  # one counter for the key, with an expiry
        assert all(0 < limit_redis.ttl(k) <= 60 for k in limit_redis.scan_iter(f"{KEY_PREFIX}*"))
        assert not any(b"cg_" in k for k in limit_redis.scan_iter("*"))  # counted by digest, never the key
        assert two.get("/v1/jobs", headers=key_for("globex")).status_code == 200


def client_count(r: redis.Redis) -> int:
    return sum(1 for _ in r.scan_iter(f"{KEY_PREFIX}*"))


def test_an_unreachable_counter_store_lets_requests_through(settings, auth):
    """Redis down must not take the API down with it: the limiter fails open and logs."""
    with TestClient(create_app(limited(settings, 1, "redis://127.0.0.1:1/0"))) as client:
        assert {client.get("/v1/jobs", headers=auth).status_code for _ in range(3)} == {200}


def test_the_counter_store_follows_the_broker_unless_configured():
    assert storage_url("", "redis://h:6379/0") == "async+redis://h:6379/0"
    assert storage_url("", "rediss://h:6380/1") == "async+rediss://h:6380/1"
    assert storage_url("", "sqla+sqlite:////x/broker.sqlite") == "async+memory://"
    assert storage_url("redis://other/2", "sqla+sqlite:///b") == "async+redis://other/2"
