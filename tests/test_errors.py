"""Engine errors name options, not flags: the CLI words them as its flags, the service as its request fields."""

from __future__ import annotations

from clipguard.app.words import api_words

from clipguard.cli import main
from clipguard.errors import ClipguardError, DataError, literal


def test_an_option_is_named_bare_by_the_engine_and_worded_by_each_front_end():
    exc = DataError(literal("data {odd} name: 16x16 images;") + " ask for resizing ({resize})", options=True)
    assert exc.options() == ["resize"]
    assert str(exc) == "data {odd} name: 16x16 images; ask for resizing (resize)"
    assert exc.worded(lambda o: f"--{o}") == "data {odd} name: 16x16 images; ask for resizing (--resize)"
    assert exc.worded(api_words).endswith('ask for resizing (the job field "resize": true)')
    assert api_words("granularity") == '"granularity"'


def test_a_plain_message_is_left_alone():
    exc = ClipguardError("a {brace} that is not an option")
    assert exc.options() == [] and str(exc) == exc.worded(api_words) == "a {brace} that is not an option"
    assert str(ClipguardError()) == ""


def test_the_cli_words_an_engine_error_with_its_own_flags(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept.txt").write_text("x")
    rc = main(
        [
            "purify",
            "--arch",
            "small_cnn",
            "--weights",
            str(tmp_path / "w.safetensors"),
            "--data",
            str(tmp_path / "d.npz"),
            "--out",
            str(out),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "set --overwrite to replace it" in err, err
