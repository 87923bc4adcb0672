"""``clipguard.remote.Client`` and the ``clipguard remote`` commands against the real service.

What a user does from a laptop: hand over a folder as ``--data`` (streamed as a tar the server
reads exactly like the folder), name data on the server, follow jobs, download and cancel, and get
one clear line when something is refused. Dropped connections are retried without creating twice.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from clipguard.data import load_data
from clipguard.remote import ApiError, Client, RemoteError, TarStream

from .conftest import LiveService
from .isolated import isolated_live

CLI = [sys.executable, "-m", "clipguard.cli"]


@pytest.fixture(scope="module")
def live(tmp_path_factory, redis_url) -> Iterator[LiveService]:  # redis_url: starts redis-server when none runs
    """This module's own service: its jobs must not count in test_e2e's ``/metrics``."""
    home = tmp_path_factory.mktemp("client-home")
    with isolated_live("client", 10, lambda db, broker: LiveService(home, db, broker)) as service:
        yield service


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, small_npz) -> Path:
    """``train/<class>/*.png`` and ``test/<class>/*.png`` from the CIFAR-10 cut, as `clipguard purify --data` reads."""
    root = tmp_path_factory.mktemp("folder") / "cifar-cut"
    data = load_data(small_npz)
    for i in range(96):  # spread over the cut (sorted by class), every third image to test: all classes in both
        index = i * len(data) // 96
        folder = root / ("test" if i % 3 == 0 else "train") / data.classes[int(data.labels[index])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.images[index].permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    return root


def test_a_folder_is_streamed_as_a_tar_the_server_reads_like_the_folder(live, image_folder):
    with Client(live.url, live.key("acme")) as client:
        dataset = client.add_dataset(f"{image_folder}#train")
    assert dataset.kind == "upload" and dataset.name == image_folder.name and dataset.size
    blob = live.logs.parent / "blobs" / f"{dataset.sha256}.tar"
    with tarfile.open(blob) as tar:  # names relative to the folder, regular files only
        members = tar.getmembers()
    assert all(m.isfile() and not m.name.startswith(("/", image_folder.name)) for m in members)
    assert len(members) == 96 and dataset.size == TarStream.estimate_size(image_folder)
    served, local = load_data(f"{blob}#train"), load_data(f"{image_folder}#train")
    assert served.classes == local.classes and len(served) == 64
    assert torch.equal(served.images, local.images) and torch.equal(served.labels, local.labels)


def test_a_folder_that_cannot_be_read_fails_the_upload_and_creates_nothing(live, image_folder, monkeypatch):
    # A file that goes away once the upload has started: the tar cannot be finished.
    listed = TarStream.files
    monkeypatch.setattr(TarStream, "estimate_size", classmethod(lambda cls, root: 0))
    monkeypatch.setattr(TarStream, "files", staticmethod(lambda root: [*listed(root), root / "vanished.png"]))
    with Client(live.url, live.key("unreadable")) as client:
        with pytest.raises(RemoteError, match="could not read the folder"):
            client.add_dataset(image_folder)
        assert list(client.datasets()) == []  # the cut-off upload did not become a dataset


def test_references_to_server_data_and_bad_local_ones_are_clear_errors(live, tmp_path):
    with Client(live.url, live.key("acme")) as client:
        with pytest.raises(ApiError) as refused:
            client.add_dataset("server:/etc")
        assert refused.value.status == 403 and refused.value.type == "/problems/path-refused"
        with pytest.raises(ApiError) as unknown:
            client.add_dataset("@no-such-dataset")
        assert unknown.value.status == 404 and "no registered dataset" in str(unknown.value)
        with pytest.raises(RemoteError, match="data reference not found"):
            client.add_dataset(tmp_path / "missing.npz")
        (tmp_path / "notes.txt").write_text("x")
        with pytest.raises(RemoteError, match=r"expected a folder, \.npz"):
            client.add_dataset(tmp_path / "notes.txt")
    with Client(live.url, "cg_wrong") as stranger, pytest.raises(ApiError) as denied:
        next(stranger.jobs())
    assert denied.value.status == 401 and denied.value.type == "/problems/unauthorized"
    assert str(denied.value).startswith("GET /v1/jobs: 401 ")


class Flaky(httpx.HTTPTransport):
    """Drops the first request ``drop`` selects: before sending it (``after=False``) or after the server answered."""

    def __init__(self, drop, *, after: bool) -> None:
        super().__init__()
        self.drop, self.after, self.dropped = drop, after, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.dropped or not self.drop(request):
            return super().handle_request(request)
        self.dropped += 1
        if self.after:
            super().handle_request(request).close()
            raise httpx.ReadError("connection reset after the request was sent")
        raise httpx.WriteError("connection reset while sending")


class Busy(httpx.HTTPTransport):
    """Answers the first status poll 503 (the job store down, retry at once) and drops the second's connection."""

    def __init__(self) -> None:
        super().__init__()
        self.polls = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path.startswith("/v1/jobs/"):
            self.polls += 1
            if self.polls == 1:
                return httpx.Response(
                    503,
                    headers={"Retry-After": "0"},
                    json={"title": "Service Unavailable", "status": 503, "detail": "store down"},
                )
            if self.polls == 2:
                raise httpx.ConnectError("connection refused")
        return super().handle_request(request)


def test_dropped_connections_are_retried_without_a_second_model_or_job(live, model_file, small_npz):
    key = live.key("flaky")
    put = Flaky(lambda r: r.method == "PUT", after=False)
    with Client(live.url, key, transport=put) as client:
        model = client.upload_model(model_file, arch="small_cnn")
        assert put.dropped == 1 and model.status in ("validating", "ready") and model.size == model_file.stat().st_size
        data = client.add_dataset(small_npz)
        client.wait_model(model.id)
    post = Flaky(lambda r: r.method == "POST" and r.url.path == "/v1/jobs", after=True)
    with Client(live.url, key, transport=post) as client:
        job = client.submit(model.id, data.id, lam=3.0)
        assert post.dropped == 1
        assert [m.id for m in client.models()] == [model.id]
        assert [j.id for j in client.jobs()] == [job.id]  # the retry carried the same Idempotency-Key
    busy = Busy()
    with Client(live.url, key, transport=busy) as client:  # a wait outlives a busy or restarting server
        assert client.wait(job.id, poll_s=0.5, timeout_s=240).state == "succeeded"
        assert busy.polls > 2


def test_listings_iterate_every_page(live, model_file):
    with Client(live.url, live.key("pages")) as client:
        made = [client.upload_model(model_file, arch="small_cnn", name=f"m{i}").id for i in range(3)]
        assert [m.id for m in client.models(page_size=2)] == made[::-1]  # newest first, across two pages


def run_cli(live, key: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CLIPGUARD_SERVER": live.url, "CLIPGUARD_API_KEY": key}
    return subprocess.run([*CLI, "remote", *args], env=env, capture_output=True, text=True, timeout=300)


def test_remote_commands_purify_a_folder_then_list_show_download_and_cancel(live, model_file, image_folder, tmp_path):
    key = live.key("cli")
    out = tmp_path / "out"
    run = run_cli(
        live,
        key,
        "purify",
        "--arch",
        "small_cnn",
        "--weights",
        str(model_file),
        "--data",
        f"{image_folder}#train",
        "--eval-data",
        f"{image_folder}#test",
        "--attack",
        "badnets",
        "--lam",
        "3",
        "--out",
        str(out),
        "--poll",
        "0.5",
        "--quiet",
    )
    assert run.returncode == 0, run.stderr[-2000:] + live.log("worker")[-2000:]
    assert {Path(line).name for line in run.stdout.split()} >= {"purified.pt", "report.json", "report.html"}
    job_id = re.search(r"clipguard: job (\w+)", run.stderr).group(1)

    listed = run_cli(live, key, "jobs")
    assert listed.returncode == 0 and job_id in listed.stdout and "succeeded" in listed.stdout
    as_json = [json.loads(line) for line in run_cli(live, key, "jobs", "--json").stdout.splitlines()]
    assert [j["id"] for j in as_json] == [job_id] and as_json[0]["params"]["lam"] == 3.0

    status = run_cli(live, key, "status", job_id)
    assert status.returncode == 0 and f"job {job_id}: succeeded" in status.stdout and "ACC" in status.stdout
    assert "purified.pt" in status.stdout

    again = tmp_path / "again"
    got = run_cli(live, key, "download", job_id, "--out", str(again), "--artifact", "purified.pt")
    assert got.returncode == 0 and [p.name for p in again.iterdir()] == ["purified.pt"]
    assert (again / "purified.pt").read_bytes() == (out / "purified.pt").read_bytes()
    assert torch.jit.load(str(again / "purified.pt"))(torch.rand(1, 3, 32, 32)).shape == (1, 10)

    for args, says in (
        (("cancel", job_id), "409"),
        (("status", "0123456789abcdef"), "404 no job"),
        (("download", job_id, "--out", str(tmp_path / "x"), "--artifact", "nope.bin"), "no artifact"),
    ):
        refused = run_cli(live, key, *args)
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and says in refused.stderr, refused.stderr
        assert refused.stderr.startswith("clipguard: error: ")


def test_tar_stream_reads_in_bounded_blocks(tmp_path):
    """A folder larger than the queue is read as the upload consumes it, not all at once."""
    root = tmp_path / "big"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        (root / f"{i}.bin").write_bytes(rng.bytes(2 * 1024 * 1024))
    stream = TarStream(root)
    try:
        first = stream.read(64 * 1024)
        assert len(first) == 64 * 1024
        time.sleep(0.5)  # room for the writer to run ahead, as far as the queue lets it
        ahead = sum(len(b) for b in list(stream._blocks.queue) if isinstance(b, bytes)) + len(stream._pending)
        assert ahead < 1024 * 1024, ahead  # of 8 MiB: the writer waits for the reader
        rest = b"".join(iter(lambda: stream.read(1 << 20), b""))
    finally:
        stream.close()
    with tarfile.open(fileobj=io.BytesIO(first + rest)) as tar:
        assert sorted(tar.getnames()) == ["0.bin", "1.bin", "2.bin", "3.bin"]
    assert len(first + rest) == TarStream.estimate_size(root)
