"""Backdoor attacks on uint8 images: BadNets, Blend, WaNet and SIG to the BackdoorBench v2 spec,
Adap-Blend, Adap-Patch and TaCT as backdoor-toolbox implements them (docs/attacks.md).

Victims for purification experiments are poisoned here, and the same trigger objects
measure ASR afterwards; see :mod:`clipguard.attacks.base` for the interface and
:mod:`clipguard.attacks.registry` for spec strings and the saved-attack format.
"""

from clipguard.attacks.adaptive import AdapBlend, AdapPatch
from clipguard.attacks.badnets import BadNets
from clipguard.attacks.base import Attack, Poisoned
from clipguard.attacks.blend import Blend
from clipguard.attacks.registry import available_attacks, build_attack, load_attack, save_attack
from clipguard.attacks.sig import SIG
from clipguard.attacks.tact import TaCT
from clipguard.attacks.wanet import WaNet

__all__ = [
    "SIG",
    "AdapBlend",
    "AdapPatch",
    "Attack",
    "BadNets",
    "Blend",
    "Poisoned",
    "TaCT",
    "WaNet",
    "available_attacks",
    "build_attack",
    "load_attack",
    "save_attack",
]
