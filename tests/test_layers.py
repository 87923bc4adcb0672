"""The import graph points down: the engine (``clipguard``) knows nothing of the service, the API (``app``)
nothing of the worker, and the engine runs where the service's dependencies are not installed.

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
LAYERS = ["clipguard", "app", "worker"]
"""Bottom to top: a package may import those before it, never those after it."""
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
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in imported_modules(path):
                top = name.split(".")[0]
                if top in LAYERS and top != package:
                    edges.setdefault((package, top), []).append(f"{path.relative_to(ROOT)}: {name}")
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
            from app.commands import register
            import worker.tasks
            return importlib.import_module("app.main")
    """)
    )
    assert imported_modules(source) == {"app.commands", "worker.tasks", "app.main"}


BLOCKER = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
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
    [SERVICE_DEPENDENCIES, [*SERVICE_DEPENDENCIES, "app", "worker"]],
    ids=["without-service-dependencies", "without-service"],
)
def test_engine_and_its_cli_work_without_the_service(blocked):
    code = textwrap.dedent("""
        import runpy
        import clipguard, clipguard.cli
        clipguard.cli.build_parser()
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
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
        from app.commands import register
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

    assert project["entry-points"][COMMANDS_GROUP] == {"service": "app.commands:register"}
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
