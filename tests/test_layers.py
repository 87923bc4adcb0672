"""The import graph points down: the engine (``clipguard``) knows nothing of the service, the API
(``clipguard.app``, the folder ``app/``) nothing of the worker (``clipguard.worker``, ``worker/``), and the
engine runs where the service's dependencies are not installed.

Imports are read from the source (every ``import`` statement, at module level or inside a function), so a
lazy import that points up fails here as well as one at the top of a file.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["clipguard", "clipguard.app", "clipguard.worker"]
"""Bottom to top: a package may import those before it, never those after it."""
FOLDERS = {"clipguard": "clipguard", "clipguard.app": "app", "clipguard.worker": "worker"}
"""Where each layer's source lives in the repository (setuptools' package-dir maps the service's folders)."""


def layer_of(module: str) -> str | None:
    """The layer a module name belongs to: the longest layer name that is the module or a parent of it."""
    owners = [layer for layer in LAYERS if module == layer or module.startswith(layer + ".")]
    return max(owners, key=len) if owners else None


SERVICE_DEPENDENCIES = [
    "alembic",
    "celery",
    "fastapi",
    "jinja2",
    "kombu",
    "limits",
    "prometheus_client",
    "psycopg",
    "psycopg_pool",
    "pydantic_settings",
    "pythonjsonlogger",
    "redis",
    "sqlalchemy",
    "starlette",
    "uvicorn",
    "uvloop",
]


def imported_modules(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (``importlib.import_module("x")`` included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in {"import_module", "__import__"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return names


def package_edges() -> dict[tuple[str, str], list[str]]:
    """(importer, imported) between the layers, each with the files that make the edge."""
    edges: dict[tuple[str, str], list[str]] = {}
    for package in LAYERS:
        for path in sorted((ROOT / FOLDERS[package]).rglob("*.py")):
            for name in imported_modules(path):
                layer = layer_of(name)
                if layer is not None and layer != package:
                    edges.setdefault((package, layer), []).append(f"{path.relative_to(ROOT)}: {name}")
    return edges


def test_imports_only_point_down():
    upward = {f"{a} -> {b}": files for (a, b), files in package_edges().items() if LAYERS.index(b) > LAYERS.index(a)}
    assert upward == {}, "an import points up the layers " + " < ".join(LAYERS)


def test_the_import_graph_has_no_cycle():
    graph: dict[str, set[str]] = {package: set() for package in LAYERS}
    for a, b in package_edges():
        graph[a].add(b)

    def reaches(start: str, goal: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph[start])

    assert [p for p in LAYERS if reaches(p, p)] == []


def test_the_checker_sees_lazy_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        textwrap.dedent("""
        def f():
            from clipguard.app.commands import register
            import clipguard.worker.tasks
            return importlib.import_module("clipguard.app.main")
    """)
    )
    assert imported_modules(source) == {"clipguard.app.commands", "clipguard.worker.tasks", "clipguard.app.main"}


BLOCKER = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
sys.meta_path.insert(0, Blocker())
sys.argv = ["clipguard", *sys.argv[2:]]
"""


def run_without(blocked: list[str], code: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code, ",".join(blocked), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    "blocked",
    [SERVICE_DEPENDENCIES, [*SERVICE_DEPENDENCIES, "clipguard.app", "clipguard.worker"]],
    ids=["without-service-dependencies", "without-service"],
)
def test_engine_and_its_cli_work_without_the_service(blocked):
    code = textwrap.dedent("""
        import runpy
        import clipguard, clipguard.cli
        clipguard.cli.build_parser()
        loaded = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
        assert not loaded, loaded
        runpy.run_module("clipguard", run_name="__main__")
    """)
    done = run_without(blocked, code, "purify", "--help")
    assert done.returncode == 0, done.stderr
    assert "usage: clipguard purify" in done.stdout


def test_service_commands_say_what_is_missing(tmp_path):
    """The service's commands load through their entry point and name the extra when its stack is absent."""
    code = textwrap.dedent("""
        import argparse
        from clipguard.app.commands import register
        parser = argparse.ArgumentParser(prog="clipguard")
        register(parser.add_subparsers())
        args = parser.parse_args(sys.argv[1:])
        sys.exit(args.func(args))
    """)
    done = run_without(SERVICE_DEPENDENCIES, code, "keys", "create", "--tenant", "t")
    assert done.returncode == 1
    assert "pip install 'clipguard[service]'" in done.stderr


def test_service_commands_are_an_entry_point():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    from clipguard.cli import COMMANDS_GROUP

    assert project["entry-points"][COMMANDS_GROUP] == {"service": "clipguard.app.commands:register"}
    service = {d.split(">")[0].split("[")[0] for d in project["optional-dependencies"]["service"]}
    core = {d.split(">")[0].split("[")[0] for d in project["dependencies"]}
    assert {"fastapi", "celery", "sqlalchemy", "alembic", "uvicorn"} <= service
    assert not core & service
    assert any(d.startswith("clipguard[") and "service" in d for d in project["optional-dependencies"]["dev"])


def test_the_version_is_defined_once():
    import tomllib

    import clipguard

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "clipguard.__version__"}
    assert f"## [{clipguard.__version__}]" in (ROOT / "CHANGELOG.md").read_text()


def test_the_wheel_installs_one_name_with_the_service_and_its_files(tmp_path):
    """``pip install clipguard`` puts only ``clipguard`` in site-packages: the service's folders land as
    ``clipguard.app`` and ``clipguard.worker``, with the console's templates and the job store's migrations
    (a wheel without them starts an API that cannot create its tables)."""
    import shutil
    import zipfile

    # built from a copy: setuptools writes build/ and *.egg-info beside the sources it builds
    source = tmp_path / "source"
    for folder in FOLDERS.values():
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source)], check=True)
    (wheel,) = tmp_path.glob("clipguard-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"clipguard"}
    for layer, folder in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            inside = init.relative_to(ROOT / folder).as_posix()
            assert f"{layer.replace('.', '/')}/{inside}" in names, f"{init.relative_to(ROOT)} is not packaged"

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    code = textwrap.dedent("""
        import clipguard, clipguard.app.migrate as migrate
        from alembic.script import ScriptDirectory
        assert clipguard.__file__.startswith(sys.argv[1]), clipguard.__file__
        heads = ScriptDirectory.from_config(migrate.alembic_config("sqlite://")).get_heads()
        assert heads, "no migrations"
        from clipguard.app.ui import pages
        assert (pages.HERE / "templates" / "base.html").is_file() and pages.HERE.is_relative_to(sys.argv[1])
    """)
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-c", "import sys\n" + code, str(site)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
