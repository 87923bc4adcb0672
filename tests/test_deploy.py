"""Static checks of the deployment files (no Docker engine runs here): Dockerfile, docker-compose.yml.

The compose file must parse, every service command must name a real entry point of this project,
every ``CLIPGUARD_*`` variable it sets must be a field ``clipguard.app.settings.Settings`` reads (and the
defaults it gives must build valid settings), and the Dockerfile must run as non-root with a health
check on the port the API listens on.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CORE = {"api", "worker", "redis", "postgres"}
PROFILES = {"s3": "s3", "flower": "ops"}
"""Optional services and the compose profile that starts each (``docker compose --profile ...``)."""
SERVICES = CORE | set(PROFILES)
OURS = ("api", "worker", "flower")
"""Services running the clipguard image: every variable they set is read by the project."""
NOT_SETTINGS = {"CUDA_VISIBLE_DEVICES"}
"""Variables of our services read by something other than Settings (CUDA picks the GPU)."""
CELERY_APP = "clipguard.worker.celery_app:celery_app"


# --- a YAML reader for the block subset the compose file is written in -------------------------
# PyYAML is not a dependency of clipguard; this reader accepts block mappings and sequences, plain
# and double-quoted scalars, JSON flow sequences and full-line comments, and refuses anything else
# (anchors, multi-line strings, inline comments), so the compose file stays in a subset it can check.

_KEY = re.compile(r"^([A-Za-z0-9_.-]+):(?:\s+(.*))?$")


def _scalar(text: str) -> Any:
    if text.startswith(("[", '"')):
        return json.loads(text)
    if text.startswith(("&", "*", "|", ">", "{", "'", "!")) or " #" in text:
        raise ValueError(f"outside the supported YAML subset: {text!r}")
    return text


def _block(lines: list[tuple[int, str]], i: int, indent: int) -> tuple[Any, int]:
    if lines[i][1].startswith("- "):
        seq: list[Any] = []
        while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
            rest = lines[i][1][2:]
            if _KEY.match(rest) and not rest.startswith(('"', "[")):
                lines[i] = (indent + 2, rest)
                item, i = _block(lines, i, indent + 2)
            else:
                item, i = _scalar(rest), i + 1
            seq.append(item)
        return seq, i
    mapping: dict[str, Any] = {}
    while i < len(lines) and lines[i][0] == indent:
        m = _KEY.match(lines[i][1])
        if not m:
            raise ValueError(f"line {lines[i]!r}: expected 'key: value'")
        key, value = m.group(1), m.group(2)
        if key in mapping:
            raise ValueError(f"duplicate key {key!r}")
        i += 1
        if value:
            mapping[key] = _scalar(value)
        elif i < len(lines) and lines[i][0] > indent:
            mapping[key], i = _block(lines, i, lines[i][0])
        else:
            mapping[key] = None
    if i < len(lines) and lines[i][0] > indent:
        raise ValueError(f"bad indentation at {lines[i]!r}")
    return mapping, i


def load_yaml(text: str) -> Any:
    lines = [
        (len(raw) - len(raw.lstrip(" ")), raw.strip())
        for raw in text.splitlines()
        if raw.strip() and not raw.lstrip().startswith("#")
    ]
    if any("\t" in raw for raw in text.splitlines()):
        raise ValueError("tabs in YAML")
    value, i = _block(lines, 0, 0)
    if i != len(lines):
        raise ValueError(f"trailing content at {lines[i]!r}")
    return value


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}`` (nested in defaults too) and ``$$`` escapes."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            depth, j = 1, i + 2
            while depth:
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            name, _, default = text[i + 2 : j - 1].partition(":-")
            out.append(env.get(name) or interpolate(default, env))
            i = j
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE.read_text())


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for line in text.splitlines()
        if line.strip()
        for parts in [line.strip().split(None, 1)]
    ]


def _command(service: dict) -> list[str]:
    cmd = service["command"]
    return cmd if isinstance(cmd, list) else shlex.split(cmd)


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# --- compose ------------------------------------------------------------------------------------


def test_compose_parses_with_the_expected_topology(compose):
    assert set(compose["services"]) == SERVICES
    assert {"artifacts", "redis-data", "postgres-data", "s3-data"} <= set(compose["volumes"])
    # `docker compose up` starts the core only; the object store and Flower are opt-in profiles
    assert {name for name, svc in compose["services"].items() if "profiles" not in svc} == CORE
    assert {name: svc["profiles"] for name, svc in compose["services"].items() if "profiles" in svc} == {
        name: [profile] for name, profile in PROFILES.items()
    }
    for name in CORE:  # a core service must never wait for an optional one (it would not start)
        assert not set(compose["services"][name].get("depends_on") or {}) & set(PROFILES), name
    try:
        import yaml
    except ImportError:
        return
    assert set(yaml.safe_load(COMPOSE.read_text())["services"]) == SERVICES


def test_every_variable_has_a_default():
    text = COMPOSE.read_text().replace("$$", "")
    refs = re.findall(r"\$\{([^}:]*)(:-)?", text)
    assert refs
    assert [name for name, default in refs if not default] == []
    assert "$" not in re.sub(r"\$\{[^}]*\}?", "", text), "bare $VAR: use ${VAR:-default} or $$"


def test_api_command_is_clipguard_serve(compose):
    from clipguard.cli import build_parser

    argv = _command(compose["services"]["api"])
    assert argv[0] == "clipguard"
    args = build_parser().parse_args(argv[1:])
    assert args.func.__name__ == "cmd_serve"
    assert args.no_worker, "the API container must not start its own embedded worker"
    assert args.host == "0.0.0.0"


def test_worker_command_is_the_real_celery_app(compose, monkeypatch, tmp_path):
    from celery import Celery
    from celery.bin.celery import celery as celery_cli

    argv = _command(compose["services"]["worker"])
    assert argv[:2] == ["celery", "-A"] and argv[3] == "worker"
    assert _option(argv, "-A") == CELERY_APP
    options = {opt for param in celery_cli.commands["worker"].params for opt in param.opts}
    assert {a for a in argv[4:] if a.startswith("-")} <= options
    assert _option(argv, "-c") == "1", "one job at a time per GPU"

    import clipguard.app.settings
    import clipguard.worker.celery_app

    monkeypatch.setenv("CLIPGUARD_HOME", str(tmp_path))
    clipguard.app.settings.get_settings.cache_clear()
    clipguard.worker.celery_app._default_app.cache_clear()
    try:
        module_name, attr = CELERY_APP.split(":")
        celery_app = getattr(importlib.import_module(module_name), attr)
        assert isinstance(celery_app, Celery)
        assert _option(argv, "-Q") in {q.name for q in celery_app.conf.task_queues}
    finally:
        clipguard.app.settings.get_settings.cache_clear()
        clipguard.worker.celery_app._default_app.cache_clear()

    check = shlex.split(compose["services"]["worker"]["healthcheck"]["test"][1])
    assert check[:5] == ["celery", "-A", CELERY_APP, "inspect", "ping"]
    inspect_options = {opt for param in celery_cli.commands["inspect"].params for opt in param.opts}
    assert {a for a in check[5:] if a.startswith("-")} <= inspect_options
    # the shell expands $HOSTNAME where celery expands %h: both are the container's hostname
    assert interpolate(_option(check, "-d"), {}).replace("$HOSTNAME", "%h") == _option(argv, "-n")


def test_uvicorn_factory_is_importable():
    """``uvicorn clipguard.app.main:create_app --factory`` (docs/deploy.md) calls it with no argument."""
    import inspect

    from clipguard.app.main import create_app

    assert all(p.default is not p.empty for p in inspect.signature(create_app).parameters.values())


def test_clipguard_variables_are_settings_fields_and_defaults_are_valid(compose, monkeypatch, tmp_path):
    from clipguard.app.settings import Settings

    fields = {f"CLIPGUARD_{name.upper()}" for name in Settings.model_fields}
    for name in OURS:
        unknown = set(compose["services"][name]["environment"]) - fields - NOT_SETTINGS
        assert not unknown, f"{name} sets variables Settings does not read: {unknown}"
    for name in ("api", "worker"):
        env = compose["services"][name]["environment"]

        for key in [k for k in os.environ if k.startswith("CLIPGUARD_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            if value is not None:  # a bare key passes the host's value through, or nothing
                monkeypatch.setenv(key, interpolate(str(value), {}))
        monkeypatch.setenv("CLIPGUARD_HOME", str(tmp_path))  # the real one is /srv/clipguard
        settings = Settings()
        assert settings.database_url.startswith("postgresql+psycopg://clipguard:clipguard@postgres:5432/")
        assert settings.broker_url == "redis://redis:6379/0"
        assert env["CLIPGUARD_HOME"] == "/srv/clipguard"
        assert settings.log_format == "json"
        assert settings.storage_url == "", "local artifacts unless the operator opts into S3"


def test_the_s3_profile_is_wired_to_the_api_and_workers(compose, monkeypatch, tmp_path):
    """With CLIPGUARD_STORAGE_URL set, api and worker build an S3 storage aimed at the s3 service with its keys."""
    from clipguard.app.settings import Settings
    from clipguard.app.storage import S3Storage, storage_for

    pytest.importorskip("boto3")
    services = compose["services"]
    s3 = services["s3"]
    port = _command(s3)[_command(s3).index("-s3") + 1 :]
    assert "-s3.port=8333" in port and any(p.endswith(":8333") for p in s3["ports"])
    keys = {k: interpolate(v, {}) for k, v in s3["environment"].items()}
    for name in ("api", "worker"):
        env = {
            k: interpolate(str(v), {"CLIPGUARD_STORAGE_URL": "s3://clipguard/artifacts"})
            for k, v in services[name]["environment"].items()
            if v is not None
        }
        for key in [k for k in os.environ if k.startswith("CLIPGUARD_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("CLIPGUARD_HOME", str(tmp_path))
        settings = Settings()
        assert (settings.s3_access_key_id, settings.s3_secret_access_key.get_secret_value()) == (
            keys["AWS_ACCESS_KEY_ID"],
            keys["AWS_SECRET_ACCESS_KEY"],
        )
        storage = storage_for(settings)  # builds the boto3 client; no request is made
        assert isinstance(storage, S3Storage) and storage.bucket == "clipguard"
        assert storage.client.meta.endpoint_url == "http://s3:8333"
    assert interpolate(services["api"]["environment"]["CLIPGUARD_S3_PUBLIC_URL"], {}).endswith(
        ":" + s3["ports"][0].rsplit(":", 1)[1]
    ), "presigned URLs must name the port the s3 service publishes"


def test_flower_runs_the_projects_celery_app(compose, dockerfile):
    flower = compose["services"]["flower"]
    argv = _command(flower)
    assert argv[:4] == ["celery", "-A", CELERY_APP, "flower"]
    port = next(a.split("=", 1)[1] for a in argv if a.startswith("--port="))
    assert any(p.endswith(f":{port}") for p in flower["ports"])
    assert f"http://127.0.0.1:{port}/healthcheck" in " ".join(flower["healthcheck"]["test"])
    assert (
        flower["environment"]["CLIPGUARD_BROKER_URL"]
        == compose["services"]["worker"]["environment"]["CLIPGUARD_BROKER_URL"]
    ), "Flower must watch the broker the workers use"
    runs = " ".join(args for op, args in dockerfile if op == "RUN")
    assert '"flower' in runs, "the image must install flower for the ops profile"


def test_services_share_the_artifact_volume_and_wait_for_healthy_dependencies(compose):
    services = compose["services"]
    for name in ("api", "worker"):
        assert "artifacts:/srv/clipguard" in services[name]["volumes"]
        for dep, cond in services[name]["depends_on"].items():
            assert cond == {"condition": "service_healthy"}
            assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"
    for name in SERVICES:
        assert services[name]["healthcheck"]["test"][0] in {"CMD", "CMD-SHELL"}
    redis = services["redis"]["command"]
    assert _option(redis, "--appendonly") == "yes"
    assert _option(redis, "--maxmemory-policy") == "noeviction"
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu[0]["capabilities"] == ["gpu"]


# --- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_is_multistage_non_root_and_installs_the_project(dockerfile):
    ops = [op for op, _ in dockerfile]
    assert ops.count("FROM") >= 2
    users = [args.split(":")[0] for op, args in dockerfile if op == "USER"]
    assert users and users[-1] not in {"root", "0"}
    runs = " ".join(args for op, args in dockerfile if op == "RUN")
    assert re.search(r'pip install "?\.(\[[a-z0-9,]+\])?"?(\s|$)', runs) and "install -e" not in runs
    assert re.search(r'"\.\[[a-z0-9,]*s3[a-z0-9,]*\]"', runs), "the image carries the S3 backend (boto3)"
    assert re.search(r'"\.\[[a-z0-9,]*postgres[a-z0-9,]*\]"', runs), "and the PostgreSQL driver with its async pool"
    assert "download.pytorch.org/whl/${TORCH_INDEX}" in runs
    assert "ARG TORCH_INDEX=cpu" in [f"{op} {args}" for op, args in dockerfile]


def test_healthcheck_expose_and_api_port_agree(dockerfile, compose):
    from clipguard.cli import build_parser

    api = _command(compose["services"]["api"])
    port = build_parser().parse_args(api[1:]).port
    cmd = json.loads(next(args for op, args in dockerfile if op == "CMD"))
    assert cmd == api, "the image's default command is the compose API command"
    assert [args for op, args in dockerfile if op == "EXPOSE"] == [str(port)]
    health = next(args for op, args in dockerfile if op == "HEALTHCHECK")
    assert f"http://127.0.0.1:{port}/healthz" in health
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(compose["services"]["api"]["healthcheck"]["test"])
    assert any(p.endswith(f":{port}") for p in compose["services"]["api"]["ports"])


def test_dockerignore_keeps_the_build_context_small_but_complete(dockerfile):
    ignored = {
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "runs", "tests"} <= ignored
    sources = [args.split()[:-1] for op, args in dockerfile if op == "COPY" and "--from" not in args]
    for src in (s for group in sources for s in group):
        assert src not in ignored and (ROOT / src).exists(), src
