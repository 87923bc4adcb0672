"""Thread bounding per job (``clipguard.threads``) and the OpenMP wait policy clipguard sets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipguard import cli
from clipguard.defenses.clipping import compute_statistics
from clipguard.errors import ClipguardError
from clipguard.models import resolve_spec
from clipguard.threads import bound_threads, choose_threads

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("value", "busy", "want"),
    [
        ("auto", 0.0, 2),
        ("auto", 0.4, 2),
        ("auto", 1.0, 1),
        ("auto", 2.0, 1),
        ("auto", 9.0, 1),
        (None, 0.0, 2),
        ("all", 9.0, 2),
        (1, 0.0, 1),
        ("3", 0.0, 3),
    ],
)
def test_auto_leaves_the_cores_other_processes_keep_busy(value, busy, want):
    assert choose_threads(value, cores=2, busy=busy) == want


@pytest.mark.parametrize("bad", ["0", "-1", "many", 0])
def test_a_bad_thread_count_is_a_clear_error(bad):
    with pytest.raises(ClipguardError, match="threads"):
        choose_threads(bad, cores=2, busy=0.0)


def test_a_job_runs_on_the_threads_it_was_given(monkeypatch, restore_threads):
    seen = {}

    def fake_evaluate(args):
        seen["threads"] = torch.get_num_threads()
        return 0

    monkeypatch.setattr(cli, "cmd_evaluate", fake_evaluate)
    torch.set_num_threads(2)
    assert cli.main(["evaluate", "--data", "unused", "--threads", "1"]) == 0
    assert seen["threads"] == 1
    monkeypatch.setenv("CLIPGUARD_THREADS", "1")
    torch.set_num_threads(2)
    assert cli.main(["evaluate", "--data", "unused"]) == 0  # the environment gives the default
    assert seen["threads"] == 1


def test_bound_threads_sets_torch(restore_threads):
    assert bound_threads(1) == 1 and torch.get_num_threads() == 1


def _policy(env: dict[str, str]) -> str:
    code = "import clipguard, os, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_importing_clipguard_makes_openmp_threads_sleep_at_barriers_unless_told_otherwise():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    assert _policy(env) == "PASSIVE"
    assert _policy({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"


def test_fast_statistics_on_one_thread_give_the_bounds_of_the_exact_pass(restore_threads):
    torch.manual_seed(0)
    spec = resolve_spec("small_cnn")
    model = spec.build().eval()
    x = torch.randn(150, 3, 32, 32)
    torch.set_num_threads(1)
    exact = compute_statistics(model, lambda: x.split(50), fast=False)
    fast = compute_statistics(model, lambda: x.split(50))
    want, got = exact.bounds(4.0), fast.bounds(4.0)
    for name in exact.names:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=float(1e-4 * want[name].abs().max()))


def test_the_worker_setting_takes_what_the_cli_takes(monkeypatch, tmp_path):
    from clipguard.app.settings import Settings
    from pydantic import ValidationError

    monkeypatch.setenv("CLIPGUARD_HOME", str(tmp_path))
    for good in ("auto", "all", "1", "16"):
        assert Settings(threads=good).threads == good
    for bad in ("0", "-2", "many"):
        with pytest.raises(ValidationError):
            Settings(threads=bad)


def test_busy_cores_counts_the_threads_runnable_now_not_the_last_minute(monkeypatch):
    import clipguard.threads as threads

    class Proc:
        def __init__(self, _path: str) -> None:
            pass

        def read_text(self) -> str:
            return "9.50 9.00 8.00 3/180 4242\n"  # a busy last minute, three runnable now (this one among them)

    monkeypatch.setattr(threads, "Path", Proc)
    assert threads.busy_cores(every_s=0) == 2.0
