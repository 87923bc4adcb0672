"""One set of defaults: the CLI, the client, the API's job body and the engine all take them from
``clipguard.methods.DEFAULTS``, so none of them can drift to a default of its own."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from clipguard.cli import build_parser
from clipguard.methods import DEFAULTS, METHOD_HELP, Granularity, Method
from clipguard.purify import PurifyOptions, Recipe, default_bounds_samples
from clipguard.remote import Client
from clipguard.stages import plan


def subparser(*path: str):
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("path", [("purify",), ("remote", "purify")], ids=["purify", "remote-purify"])
def test_the_command_lines_take_the_defaults_and_offer_every_choice(path):
    parser = subparser(*path)
    options = {a.dest: a for a in parser._actions}
    assert options["method"].default == DEFAULTS.method
    assert options["granularity"].default == DEFAULTS.granularity
    assert list(options["method"].choices) == list(Method)
    assert list(options["granularity"].choices) == list(Granularity)
    for method in Method:
        assert METHOD_HELP[method] in options["method"].help


def test_the_engine_takes_the_defaults():
    options = PurifyOptions(arch="small_cnn", weights=Path("w"), data="d", out=Path("o"))
    assert (options.method, options.granularity, options.batch_size) == (
        DEFAULTS.method,
        DEFAULTS.granularity,
        DEFAULTS.batch_size,
    )
    assert options.recipe() == Recipe()
    for method in Method:
        assert Recipe(method=method).check() == DEFAULTS.lam_for(method)
    assert default_bounds_samples(Granularity.CHANNEL) == DEFAULTS.bounds_samples
    assert default_bounds_samples("element") == 0
    assert plan() == plan(method=DEFAULTS.method)


def test_the_client_takes_the_defaults():
    signature = inspect.signature(Client.submit).parameters
    assert signature["method"].default == DEFAULTS.method
    assert signature["granularity"].default == DEFAULTS.granularity


def test_an_unknown_method_or_granularity_is_refused_by_name():
    from clipguard.errors import ClipguardError

    with pytest.raises(ClipguardError, match="choose one of guard, paper"):
        Recipe(method="mmbm").check()  # type: ignore[arg-type]
    with pytest.raises(ClipguardError, match="channel, element"):
        Recipe(granularity="pixel").check()  # type: ignore[arg-type]


def test_the_api_takes_the_defaults():
    pytest.importorskip("fastapi")
    from clipguard.app.schemas import JobCreate

    job = JobCreate(model_id="a" * 32, train_data_id="b" * 32)
    assert (job.method, job.granularity) == (DEFAULTS.method, DEFAULTS.granularity)
    lam = JobCreate.model_fields["lam"].description or ""
    for method in Method:
        assert f"{DEFAULTS.lam_for(method):g} for `{method}`" in lam
    assert (
        JobCreate.model_validate({"model_id": "a" * 32, "train_data_id": "b" * 32, "method": "paper"}).method
        is Method.PAPER
    )


def test_reports_write_the_plain_names():
    """A report or job row holds the value (``"guard"``), never an enum's repr."""
    import json

    assert json.dumps({"method": Method.GUARD, "granularity": Granularity.ELEMENT}) == (
        '{"method": "guard", "granularity": "element"}'
    )
    assert f"{Method.PAPER}" == "paper"
