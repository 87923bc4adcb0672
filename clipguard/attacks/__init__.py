"""Backdoor attacks on uint8 images: BadNets, Blend and WaNet to the BackdoorBench v2 spec.

Victims for purification experiments are poisoned here, and the same trigger objects
measure ASR afterwards; see :mod:`clipguard.attacks.base` for the interface and
:mod:`clipguard.attacks.registry` for spec strings and the saved-attack format.
"""

from clipguard.attacks.badnets import BadNets
from clipguard.attacks.base import Attack, Poisoned
from clipguard.attacks.blend import Blend
from clipguard.attacks.registry import available_attacks, build_attack, load_attack, save_attack
from clipguard.attacks.wanet import WaNet

__all__ = [
    "Attack",
    "BadNets",
    "Blend",
    "Poisoned",
    "WaNet",
    "available_attacks",
    "build_attack",
    "load_attack",
    "save_attack",
]
