"""How the API names the engine's options, for engine errors a client reads.

The engine names a setting by its option name (``clipguard.errors``); a client of the API sets
it as a field of a request, or cannot set it at all (the server's own configuration).
"""

from __future__ import annotations

ENGINE_OPTION_WORDS = {
    "resize": 'the job field "resize": true',
    "method": 'the job field "method"',
    "attack": 'the job field "attack"',
    "lam": 'the job field "lam"',
    "num_classes": 'the model\'s "num_classes"',
    "mean": 'the model\'s "mean"',
    "std": 'the model\'s "std"',
    "device": "the server's device (CLIPGUARD_DEVICE)",
}


def api_words(name: str) -> str:
    """An engine option as an API client knows it: the field that sets it, else its name in quotes."""
    return ENGINE_OPTION_WORDS.get(name, f'"{name}"')
