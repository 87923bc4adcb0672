"""A bounded schemathesis fuzz of the OpenAPI document against a real uvicorn on PostgreSQL and Redis.

Every operation gets a few dozen generated requests, valid and invalid, with a valid API key
(and without one, which schemathesis tries by itself). The contract checked is the one
docs/api.md promises: the server never answers 5xx to anything a client sends, and every
4xx is ``application/problem+json`` with a coherent body. PostgreSQL rather than SQLite
because it is the stricter store (NUL bytes, lengths, JSON numbers) and the production one.

Checkpoint uploads go through the real quarantine subprocess; its memory cap is set low so
that each one fails fast at ``import torch`` instead of spending seconds of CPU per example
(the quarantine's own verdicts are tested in test_api.py and test_hostile.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from .conftest import free_port, wait_until

PROBLEM = "application/problem+json"
MAX_EXAMPLES = 30


class FuzzServer:
    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, pg_url, redis_url) -> Iterator[FuzzServer]:
    home = tmp_path_factory.mktemp("fuzz-home")
    root = home / "data-root"
    root.mkdir()
    env = {
        **os.environ,
        "CLIPGUARD_HOME": str(home),
        "CLIPGUARD_DATABASE_URL": pg_url,
        "CLIPGUARD_BROKER_URL": redis_url,
        "CLIPGUARD_MAX_UPLOAD_BYTES": str(1 << 20),
        "CLIPGUARD_DATA_ROOTS": f'["{root}"]',
        "CLIPGUARD_DATASETS": f'{{"tiny": "{root}/tiny.npz"}}',
        "CLIPGUARD_RATE_LIMIT_PER_MINUTE": "0",
        "CLIPGUARD_QUARANTINE_MEMORY_BYTES": str(256 << 20),
        # No worker runs here, so /readyz would rightly answer 503 (test_supervision.py tests that).
        "CLIPGUARD_READY_REQUIRES_WORKER": "false",
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (home / "api.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "clipguard.app.main:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 60, "the fuzzed API to start")
        key = subprocess.run(
            [sys.executable, "-m", "clipguard.cli", "keys", "create", "--tenant", "fuzz"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        yield FuzzServer(url, key)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        server_log = (home / "api.log").read_text(errors="replace")
        assert "Traceback" not in server_log, server_log[-4000:]


def test_no_server_errors_and_every_error_is_problem_json(fuzz_server):
    """Each operation, valid then invalid inputs; all contract breaks are collected and reported together.

    The operations are driven through hypothesis directly (``as_strategy``) rather than
    schemathesis's pytest plugin, whose lazy fixture loader does not work with pytest 9.
    """
    api = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    failures: list[str] = []
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(operation, mode, fuzz_server, failures)
    assert not failures, "\n".join(sorted(set(failures))[:30])


def _fuzz(operation, mode: GenerationMode, server: FuzzServer, failures: list[str]) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis_settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def exercise(case) -> None:
        response = case.call(base_url=server.url, headers=server.auth, timeout=30)
        problem = _contract_break(response)
        if problem:
            failures.append(f"{case.method} {case.formatted_path} ({mode.value}) -> {problem}")

    try:
        exercise()
    except Unsatisfiable:  # nothing to make invalid (an operation without parameters): nothing to test
        assert mode is GenerationMode.NEGATIVE, operation.label


def _contract_break(response) -> str | None:
    status, text = response.status_code, response.text[:300]
    if status >= 500:
        return f"{status}: {text}"
    if status >= 400:
        content_type = response.headers.get("content-type") or [None]  # schemathesis keeps each header's values
        if content_type[0] != PROBLEM:
            return f"{status} as {content_type[0]}: {text}"
        body = response.json()
        if body.get("status") != status or not body.get("title") or not body.get("type"):
            return f"{status} with an incoherent problem body: {text}"
    return None
