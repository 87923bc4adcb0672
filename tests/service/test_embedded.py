"""The embedded default, as a user runs it: ``clipguard keys create``, ``clipguard serve`` (no Redis:
SQLite store and SQLite-backed Celery transport), then ``clipguard remote purify``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import torch

CLI = [sys.executable, "-m", "clipguard.cli"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_and_remote_purify_without_redis(tmp_path, model_file, small_npz):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPGUARD_")}
    env.update(CLIPGUARD_HOME=str(tmp_path / "home"), CLIPGUARD_DEVICE="cpu")
    key = subprocess.run(
        [*CLI, "keys", "create", "--tenant", "solo"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert key.startswith("cg_") and key.count("\n") == 1  # only the key
    port = _port()
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen([*CLI, "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        out = tmp_path / "out"
        run = subprocess.run(
            [
                *CLI,
                "remote",
                "purify",
                "--server",
                f"http://127.0.0.1:{port}",
                "--api-key",
                key.strip(),
                "--arch",
                "small_cnn",
                "--weights",
                str(model_file),
                "--data",
                str(small_npz),
                "--lam",
                "3",
                "--out",
                str(out),
                "--poll",
                "0.5",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert run.returncode == 0, run.stderr[-2000:] + (tmp_path / "serve.log").read_text()[-3000:]
        assert {"purified.pt", "bounds.safetensors", "report.json", "report.html"} <= {p.name for p in out.iterdir()}
        assert torch.jit.load(str(out / "purified.pt"))(torch.rand(2, 3, 32, 32)).shape == (2, 10)

        bad = subprocess.run(
            [
                *CLI,
                "remote",
                "purify",
                "--server",
                f"http://127.0.0.1:{port}",
                "--api-key",
                "nope",
                "--arch",
                "small_cnn",
                "--weights",
                str(model_file),
                "--data",
                str(small_npz),
                "--out",
                str(tmp_path / "x"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "401" in bad.stderr
    finally:
        server.send_signal(signal.SIGTERM)  # serve stops its worker too
        server.wait(timeout=60)
