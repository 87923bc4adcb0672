"""The architecture registry: the only place a model's code can come from.

Uploaded checkpoints carry weights only; the network they fill is built here from a name,
so nothing in an upload ever runs. Each entry also knows the input size and normalisation
its checkpoints expect, because the bounds are only meaningful on inputs distributed like
the training inputs.

Builders follow torchvision's style: small modules, explicit arguments, no globals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from clipguard.errors import ModelSpecError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- architectures


class BasicBlock(nn.Module):
    """ResNet basic block (conv-BN-ReLU ordering, as in the CIFAR ResNet-18 of the paper)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem, no max-pool, four stages, global average pool."""

    def __init__(self, blocks: Sequence[int], num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=False)
        in_planes = width
        stages = []
        for i, n in enumerate(blocks):
            planes = width * 2**i
            layers = []
            for j in range(n):
                layers.append(BasicBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class PreActBlock(nn.Module):
    """Pre-activation block (BN-ReLU before each conv), as in BackdoorBench's victim."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct-ResNet18 for 32x32 inputs; like BackdoorBench's, no final BN-ReLU before pooling."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        in_planes = 64
        stages = []
        for i, planes in enumerate((64, 128, 256, 512)):
            stages.append(
                nn.Sequential(PreActBlock(in_planes, planes, 1 if i == 0 else 2), PreActBlock(planes, planes))
            )
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(torch.flatten(self.avgpool(x), 1))


VGG16_CFG: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


class CifarVGG(nn.Module):
    """VGG with batch norm for 32x32 inputs (a 512-d feature after five pools)."""

    def __init__(self, cfg: Sequence[int | str] = VGG16_CFG, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=False)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class SmallCNN(nn.Module):
    """A four-conv network that trains on a CIFAR subset in seconds on a laptop CPU.

    It exists so tests and the demo exercise the real pipeline (training, backdoor,
    bounds, export) within CI's budget; it is not meant to be a strong classifier.
    """

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(3, w),
            nn.MaxPool2d(2),
            block(w, 2 * w),
            nn.MaxPool2d(2),
            block(2 * w, 4 * w),
            nn.MaxPool2d(2),
            block(4 * w, 4 * w),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ModelSpec:
    """How to build an architecture and what inputs its checkpoints expect."""

    arch: str
    num_classes: int
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fixed_input: bool = True
    """True: images must be exactly ``input_size`` (the CIFAR networks here). False: ``input_size`` is the
    largest image taken (torchvision's classifiers pool adaptively and run at smaller sizes, CIFAR's 32x32)."""

    def build(self) -> nn.Module:
        """A freshly initialised network; weights come from :mod:`clipguard.checkpoint`."""
        return _build(self.arch, self.num_classes)

    def to_dict(self) -> dict:
        return {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
        }


_CIFAR = {"input_size": (32, 32), "mean": CIFAR10_MEAN, "std": CIFAR10_STD}
_BUILDERS: dict[str, tuple[Callable[[int], nn.Module], dict]] = {
    "resnet18": (lambda n: CifarResNet((2, 2, 2, 2), n), _CIFAR),
    "preact_resnet18": (lambda n: PreActResNet18(n), _CIFAR),
    "vgg16_bn": (lambda n: CifarVGG(VGG16_CFG, n), _CIFAR),
    "small_cnn": (lambda n: SmallCNN(n), _CIFAR),
}
TORCHVISION_PREFIX = "torchvision:"


def available_architectures() -> list[str]:
    """Registry names; any torchvision classifier is also accepted as ``torchvision:<name>``."""
    return [*sorted(_BUILDERS), TORCHVISION_PREFIX + "<name>"]


def _torchvision_names() -> list[str]:
    from torchvision import models as tvm

    return sorted(tvm.list_models(module=tvm))


def _build(arch: str, num_classes: int) -> nn.Module:
    if arch in _BUILDERS:
        return _BUILDERS[arch][0](num_classes)
    if arch.startswith(TORCHVISION_PREFIX):
        from torchvision import models as tvm

        name = arch[len(TORCHVISION_PREFIX) :]
        if name not in _torchvision_names():
            raise ModelSpecError(f"unknown torchvision classifier {name!r}")
        try:
            return tvm.get_model(name, weights=None, num_classes=num_classes)
        except (TypeError, ValueError) as exc:
            raise ModelSpecError(f"cannot build {arch} with {num_classes} classes: {exc}") from exc
    raise ModelSpecError(f"unknown architecture {arch!r}; choose one of {', '.join(available_architectures())}")


def resolve_spec(
    arch: str,
    num_classes: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_size: Sequence[int] | None = None,
) -> ModelSpec:
    """The registry defaults for ``arch`` with the caller's overrides applied and checked."""
    if arch in _BUILDERS:
        defaults = _BUILDERS[arch][1]
    elif arch.startswith(TORCHVISION_PREFIX):
        if arch[len(TORCHVISION_PREFIX) :] not in _torchvision_names():
            raise ModelSpecError(f"unknown torchvision classifier {arch[len(TORCHVISION_PREFIX) :]!r}")
        defaults = {"input_size": (224, 224), "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    else:
        raise ModelSpecError(f"unknown architecture {arch!r}; choose one of {', '.join(available_architectures())}")
    spec = ModelSpec(arch, 10, defaults["input_size"], defaults["mean"], defaults["std"], fixed_input=arch in _BUILDERS)
    if num_classes is not None:
        if num_classes < 2:
            raise ModelSpecError(f"num_classes must be at least 2, got {num_classes}")
        spec = replace(spec, num_classes=int(num_classes))
    for name, value in (("mean", mean), ("std", std)):
        if value is not None:
            vals = tuple(float(v) for v in value)
            if len(vals) != 3:
                raise ModelSpecError(f"--{name} needs 3 comma-separated numbers, got {len(vals)}")
            if name == "std" and any(v <= 0 for v in vals):
                raise ModelSpecError("{std} values must be positive", options=True)
            triple = (vals[0], vals[1], vals[2])
            spec = replace(spec, mean=triple) if name == "mean" else replace(spec, std=triple)
    if input_size is not None:
        size = tuple(int(v) for v in input_size)
        if len(size) != 2 or min(size) < 8:
            raise ModelSpecError(f"input size must be two integers >= 8, got {input_size}")
        spec = replace(spec, input_size=size)
    return spec


def parse_floats(text: str) -> tuple[float, ...]:
    """``"0.49,0.48,0.45"`` -> floats, with an error that names the bad piece."""
    try:
        return tuple(float(p) for p in text.split(","))
    except ValueError as exc:
        raise ModelSpecError(f"expected comma-separated numbers, got {text!r}") from exc
