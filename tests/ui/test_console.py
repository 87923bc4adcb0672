"""The console in a real browser against the real service: sign in, upload, watch, read, download.

One end-to-end flow (a small_cnn checkpoint and a CIFAR-10 cut through uvicorn, Celery, PostgreSQL
and Redis) and quick negative cases: a wrong key, a checkpoint that would run code, API errors.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from clipguard.remote import Client

from .conftest import SCREENSHOTS, sign_in

expect = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)").expect

JOB_TIMEOUT_MS = 240_000


def shot(page: object, name: str) -> None:
    """The whole page as one picture; the viewport is stretched rather than using ``full_page``, which
    leaves the sandboxed report frame (a separate renderer process) blank."""
    if not SCREENSHOTS:
        return
    Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
    size = page.viewport_size
    page.set_viewport_size({"width": size["width"], "height": page.evaluate("document.documentElement.scrollHeight")})
    page.wait_for_timeout(300)
    path = Path(SCREENSHOTS) / f"console-{name}.png"
    page.screenshot(path=str(path))
    page.set_viewport_size(size)
    with Image.open(path) as image:  # a 256-colour palette keeps each picture small enough for the docs
        image.convert("RGB").quantize(256).save(path, optimize=True)


class Exec:
    """Unpickling this runs code (writes ``marker``): what the quarantine must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, model_file, small_npz, cifar10, data_cache) -> tuple[Path, Path, Path, str | Path]:
    """Checkpoint, training data, test data and attack of the flow: the small untrained CNN in a test run;
    with ``CLIPGUARD_UI_SCREENSHOTS`` a real BadNets victim, so that the pictures show a verdict worth reading."""
    if not SCREENSHOTS:
        return model_file, small_npz, small_npz, "badnets"
    from clipguard.train import train_victim

    root = tmp_path_factory.mktemp("victim")
    train_victim(
        arch="small_cnn",
        data=f"{cifar10}#train",
        out=root / "victim.safetensors",
        limit=2000,
        epochs=5,
        augment=False,
        lr=0.05,
        batch_size=128,
        attack="badnets:pattern=checkerboard",
        poison_rate=0.1,
        device="cpu",
        cache_dir=data_cache,
        save_data=root / "poisoned.npz",
    )
    return root / "victim.safetensors", root / "poisoned.npz", small_npz, root / "victim.safetensors.attack.json"


def test_sign_in_upload_watch_the_job_read_the_report_and_download(live, page, inputs, tmp_path):
    weights, train, test, attack = inputs
    key = live.key("acme")
    sign_in(page, live.url, key)
    page.wait_for_url(re.compile(r"/ui/jobs$"))
    assert key not in page.url
    cookie = next(c for c in page.context.cookies() if c["name"] == "clipguard_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    assert page.evaluate("document.cookie") == ""  # the key is out of the scripts' reach

    page.click("text=New job")
    page.set_input_files("#weights", str(weights))
    page.fill("#arch", "small_cnn")
    page.set_input_files("#train-file", str(train))
    page.set_input_files("#test-file", str(test))
    if isinstance(attack, Path):
        page.set_input_files("#attack-file", str(attack))
    else:
        page.fill("#attack", attack)
    page.fill("#lam", "3")
    shot(page, "new-job")
    page.click("#submit")

    page.wait_for_url(re.compile(r"/ui/jobs/[0-9a-f]+$"))
    job_id = page.url.rsplit("/", 1)[1]
    page.wait_for_selector("#job[data-state=succeeded]", timeout=JOB_TIMEOUT_MS)
    assert page.inner_text("#state") == "succeeded"
    assert page.get_attribute("#percent", "value") == "100"

    # ACC/ASR before and after, from the job's summary.
    rows = page.query_selector_all("#metrics tr[data-metric]")
    metrics = {row.get_attribute("data-metric"): row.inner_text() for row in rows}
    assert {"acc", "asr", "lam"} <= set(metrics), metrics
    assert "3.00" in metrics["lam"] and re.search(r"\d+\.\d%", metrics["acc"])
    # The verdict, in the CLI's words, from report.json: its status, then what was done.
    verdict = page.inner_text("#verdict")
    assert re.search(r"^(Backdoor found|No evidence of a backdoor|Inconclusive): ", verdict), verdict
    assert "Done: " in verdict and "clipped" in verdict, verdict

    # Every artifact is linked; the report is embedded in a sandboxed frame and renders there.
    names = {a.get_attribute("data-artifact") for a in page.query_selector_all("#artifacts tr[data-artifact]")}
    assert {"purified.pt", "bounds.safetensors", "report.json", "report.html"} <= names
    assert page.get_attribute("#report", "sandbox") == ""
    report = page.frame_locator("#report")
    assert "purification report" in report.locator("h1").inner_text().lower()
    framed = page.request.get(live.url + page.get_attribute("#report", "src"))  # the session cookie, as the frame
    assert framed.headers["content-security-policy"].startswith("sandbox;")
    assert framed.headers["content-disposition"] == "inline" and framed.headers["content-type"].startswith("text/html")
    shot(page, "job")

    # Download purified.pt through the console: the bytes the API lists, a model that loads.
    with page.expect_download() as download:
        page.click("#artifacts a[download='purified.pt']")
    saved = tmp_path / "purified.pt"
    download.value.save_as(saved)
    job = httpx.get(f"{live.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}).json()
    listed = next(a for a in job["artifacts"] if a["name"] == "purified.pt")
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == listed["sha256"]
    assert torch.jit.load(str(saved))(torch.rand(2, 3, 32, 32)).shape == (2, 10)

    # The jobs page lists the job, the model and both datasets (one upload per file input).
    page.click("text=Jobs")
    row = page.locator(f"#jobs tr[data-job='{job_id}']")
    row.wait_for()
    assert row.get_attribute("data-state") == "succeeded"
    expect(page.locator("#models tbody tr")).to_have_count(1)
    expect(page.locator("#models tbody")).to_contain_text("ready")
    expect(page.locator("#datasets tbody tr")).to_have_count(2)
    shot(page, "jobs")


def test_a_wrong_key_is_refused_and_nothing_is_kept(live, page):
    sign_in(page, live.url, "cg_not-a-key-anyone-issued")
    assert "not valid" in page.inner_text("#login-error")
    assert not [c for c in page.context.cookies() if c["name"] == "clipguard_console"]
    shot(page, "login-refused")
    page.goto(f"{live.url}/ui/jobs")
    page.wait_for_url(re.compile(r"/ui/login$"))


def test_hostile_files_are_refused_with_the_reason_and_a_retry_resumes(live, page, model_file, tmp_path):
    """A checkpoint that would run code is rejected by the quarantine; the retry with a sound one reuses the
    data already uploaded, and the job on an archive with a link out of it fails with the engine's reason."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(1), "x": Exec(marker)}, evil)
    archive = tmp_path / "links.tar"
    with tarfile.open(archive, "w") as tar:
        link = tarfile.TarInfo("airplane/0.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    sign_in(page, live.url, live.key("hostile"))
    page.goto(f"{live.url}/ui/new")
    page.set_input_files("#weights", str(evil))
    page.set_input_files("#train-file", str(archive))
    page.click("#submit")
    error = page.locator("#error")
    expect(error).to_contain_text("The checkpoint was rejected")
    assert "exec" in error.inner_text() and not marker.exists()
    assert page.inner_text("#submit") == "Retry"

    page.set_input_files("#weights", str(model_file))
    page.click("#submit")
    page.wait_for_url(re.compile(r"/ui/jobs/[0-9a-f]+$"))
    page.wait_for_selector("#job[data-state=failed]", timeout=JOB_TIMEOUT_MS)
    assert "refusing link member" in page.inner_text("#job-error")
    assert page.locator("#results").is_hidden() and page.locator("#cancel").is_hidden()
    with Client(live.url, live.key("hostile")) as client:
        assert len(list(client.datasets())) == 1  # the retry did not upload the archive again


def test_a_job_is_cancelled_from_the_jobs_page(live, page, model_file, small_npz):
    key = live.key("cancel")
    with Client(live.url, key) as client:
        model = client.upload_model(model_file, arch="small_cnn")
        data = client.add_dataset(small_npz)
        client.wait_model(model.id)
        job = client.submit(model.id, data.id, lam="auto", test_data_id=data.id)
    sign_in(page, live.url, key)
    row = page.locator(f"#jobs tr[data-job='{job.id}']")
    row.locator("button[data-cancel]").click()
    row.locator("button[data-cancel]", has_text="Confirm cancel").click()  # two clicks, no dialog
    expect(page.locator(f"#jobs tr[data-job='{job.id}'][data-state=cancelled]")).to_have_count(1, timeout=60_000)
    with Client(live.url, key) as client:
        assert client.job(job.id).state == "cancelled"


def test_api_errors_read_as_messages(live, page, model_file, tmp_path):
    """problem+json answers become the detail a person can act on: a refused path, a field error, a 404."""
    sign_in(page, live.url, live.key("acme"))
    page.goto(f"{live.url}/ui/new")
    huge = tmp_path / "huge.safetensors"
    with huge.open("wb") as f:  # sparse: over the server's upload limit without writing it
        f.truncate(live.MAX_UPLOAD + 1)
    page.set_input_files("#weights", str(huge))
    page.click("#submit")
    expect(page.locator("#error")).to_contain_text("this server takes uploads up to 64.0 MiB")

    page.set_input_files("#weights", str(model_file))
    page.fill("#arch", "not an architecture!")  # the API's pattern: a 422 with the field named
    page.fill("#train-ref", "server:/etc")
    page.click("#submit")
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert "arch" in error.inner_text() and "pattern" in error.inner_text(), error.inner_text()

    page.fill("#arch", "small_cnn")  # resumes: the model step now passes, the data step is refused (403)
    page.click("#submit")
    expect(error).to_contain_text("not under a configured data root")  # the CSP forbids wait_for_function's eval

    page.goto(f"{live.url}/ui/jobs/0123456789abcdef")  # no such job (or another tenant's: the same answer)
    expect(page.locator("#error")).to_contain_text("no job 0123456789abcdef")
