"""Backdoor attacks: exact trigger pixels, BackdoorBench poisoning counts, and exact save/load.

Synthetic uint8 images only; each test runs in well under a second on one CPU core.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipguard.attacks import (
    SIG,
    AdapBlend,
    AdapPatch,
    Attack,
    BadNets,
    Blend,
    Poisoned,
    TaCT,
    WaNet,
    available_attacks,
    build_attack,
    load_attack,
    save_attack,
)
from clipguard.attacks.registry import tensors_path
from clipguard.data import ImageData
from clipguard.errors import ClipguardError, DataError


def images(n: int = 8, size: tuple[int, int] = (32, 32), seed: int = 0, high: int = 256) -> torch.Tensor:
    return torch.randint(0, high, (n, 3, *size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def smooth_images(n: int = 4, size: int = 32) -> torch.Tensor:
    """Natural-image-like content (smooth gradients), on which a small warp moves pixels little."""
    r = torch.linspace(0, 1, size, dtype=torch.float64)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    chans = [torch.sin(3 * xx + i) * torch.cos(2 * yy - i) for i in range(3 * n)]
    x = torch.stack(chans).view(n, 3, size, size)
    return ((x + 1) * 127.5).round().to(torch.uint8)


def dataset(n: int = 1000, k: int = 10, size: tuple[int, int] = (32, 32)) -> ImageData:
    labels = torch.arange(n, dtype=torch.int64) % k
    return ImageData(images(n, size, seed=1), labels, tuple(str(c) for c in range(k)), "synthetic")


def identity_grid(h: int, w: int) -> torch.Tensor:
    x, y = torch.meshgrid(
        torch.linspace(-1, 1, h, dtype=torch.float64), torch.linspace(-1, 1, w, dtype=torch.float64), indexing="ij"
    )
    return torch.stack((y, x), dim=-1)[None]


# --------------------------------------------------------------------------- BadNets


def test_badnets_default_is_backdoorbench_white_3x3_bottom_right():
    x = images(high=255)  # no 255 in the input, so every patch pixel really changes
    out = build_attack("badnets").apply(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[29:32, 29:32] = True
    assert torch.equal((out != x).all(1).all(0), mask)  # changed in every channel and image
    assert torch.equal((out != x).any(1).any(0), mask)  # and nowhere else
    assert (out[:, :, 29:32, 29:32] == 255).all()
    assert torch.equal(out[:, :, ~mask], x[:, :, ~mask])
    assert not torch.equal(out, x) and x.max() < 255  # input untouched (no in-place stamping)


def test_badnets_checkerboard_and_black_patterns_are_exact():
    x = images(4, high=255)
    out = build_attack("badnets:pattern=checkerboard").apply(x)
    board = torch.tensor([[255, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    assert torch.equal(out[:, :, 29:, 29:], board.expand(4, 3, 3, 3))
    out4 = build_attack("badnets:pattern=checkerboard,size=4,value=200").apply(x)
    i = torch.arange(4)
    expected = torch.where((i[:, None] + i[None, :]) % 2 == 0, 200, 0).to(torch.uint8)
    assert torch.equal(out4[:, :, 28:, 28:], expected.expand(4, 3, 4, 4))
    assert (build_attack("badnets:pattern=black").apply(x)[:, :, 29:, 29:] == 0).all()
    assert (build_attack("badnets:value=128").apply(x)[:, :, 29:, 29:] == 128).all()  # low-contrast grey


@pytest.mark.parametrize(
    ("position", "size", "hw", "origin"),
    [
        ("top-left", 5, (32, 32), (0, 0)),
        ("top-right", 3, (32, 32), (0, 29)),
        ("bottom-left", 4, (32, 32), (28, 0)),
        ("bottom-right", 3, (48, 40), (45, 37)),  # named corners follow the image size
        ("3,7", 2, (32, 32), (3, 7)),
    ],
)
def test_badnets_positions(position, size, hw, origin):
    x = images(3, hw, high=255)
    attack = build_attack(f"badnets:position={position},size={size}", image_size=hw)
    out = attack.apply(x)
    r, c = origin
    mask = torch.zeros(hw, dtype=torch.bool)
    mask[r : r + size, c : c + size] = True
    assert torch.equal((out != x).any(1).any(0), mask)
    assert (out[:, :, mask] == 255).all()


def test_empty_batches_pass_through():
    for name in available_attacks():
        assert build_attack(name).apply(images(0)).shape == (0, 3, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triggers_are_identical_on_gpu():
    x = images(64, seed=3)
    for spec in ("badnets", "blend", "wanet", "sig", "adap_blend", "adap_patch", "tact"):
        attack = build_attack(spec)
        out = attack.apply(x.cuda())
        assert out.device.type == "cuda" and torch.equal(out.cpu(), attack.apply(x)), spec
    for spec in ("adap_blend", "adap_patch"):  # training-time triggers (random block masks, quarters) too
        attack = build_attack(spec)
        out = attack.stamp_poison(x.cuda(), torch.Generator().manual_seed(1))
        assert torch.equal(out.cpu(), attack.stamp_poison(x, torch.Generator().manual_seed(1))), spec
    wanet = build_attack("wanet:poisoning=per_batch")
    out, labels = wanet.poison_batch(x.cuda(), torch.ones(64, dtype=torch.int64).cuda(), torch.Generator(), rate=0.05)
    assert out.device.type == "cuda" and int((labels == 0).sum()) == 3


# --------------------------------------------------------------------------- Blend


def test_blend_matches_the_mixing_formula_exactly():
    x = images(6)
    attack = build_attack("blend:alpha=0.3", seed=5)
    assert isinstance(attack, Blend)
    t = attack.pattern.numpy().astype(np.float64)
    expected = np.clip(np.rint((1 - 0.3) * x.numpy().astype(np.float64) + 0.3 * t), 0, 255).astype(np.uint8)
    out = attack.apply(x)
    assert out.dtype == torch.uint8
    np.testing.assert_array_equal(out.numpy(), expected)
    default = build_attack("blend")
    assert default.alpha == 0.2 and default.pattern.shape == (3, 32, 32)


def test_blend_noise_is_deterministic_per_seed_and_differs_across_seeds():
    x = images(3)
    a, b, c = build_attack("blend", seed=1), build_attack("blend", seed=1), build_attack("blend", seed=2)
    assert torch.equal(a.pattern, b.pattern) and torch.equal(a.apply(x), b.apply(x))
    assert not torch.equal(a.pattern, c.pattern)
    assert torch.equal(build_attack("blend:seed=2").pattern, c.pattern)
    # uniform noise over the whole uint8 range
    assert a.pattern.min() < 10 and a.pattern.max() > 245


def test_blend_user_image_is_resized_rgb(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (40, 50, 4), dtype=np.uint8)
    path = tmp_path / "kitty.png"
    Image.fromarray(rgba, "RGBA").save(path)
    attack = build_attack(f"blend:image={path},alpha=0.1")
    expected = np.asarray(Image.open(path).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(attack.pattern.numpy(), expected.transpose(2, 0, 1))
    assert attack.to_dict()["image"] == str(path) and attack.alpha == 0.1


def test_blend_refuses_unreadable_or_missing_images(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="cannot read blend trigger image"):
        build_attack(f"blend:image={bad}")
    with pytest.raises(DataError, match="not found"):
        build_attack(f"blend:image={tmp_path / 'missing.png'}")


def test_triggers_refuse_wrong_images():
    with pytest.raises(DataError, match="uint8"):
        build_attack("badnets").apply(torch.zeros(2, 3, 32, 32))
    with pytest.raises(DataError, match="32x32"):
        build_attack("blend").apply(images(2, (16, 16)))
    with pytest.raises(DataError, match="32x32"):
        build_attack("wanet").apply(images(2, (16, 16)))


# --------------------------------------------------------------------------- WaNet


def test_wanet_grid_follows_the_paper_recipe():
    """Re-derive the grid from the spec (survey §2.5) independently and compare."""
    k, s, h = 4, 0.5, 32
    attack = build_attack("wanet", seed=3)
    assert isinstance(attack, WaNet)
    ins = torch.rand(1, 2, k, k, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ins = ins / torch.mean(torch.abs(ins))
    noise = F.interpolate(ins.double(), size=h, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    grid = torch.clamp(identity_grid(h, h) + s * noise / h, -1, 1)
    torch.testing.assert_close(attack.grid, grid, rtol=0, atol=1e-12)


def test_wanet_warp_is_small_bounded_and_deterministic():
    attack = build_attack("wanet", seed=0)
    grid = attack.grid
    assert grid.shape == (1, 32, 32, 2) and grid.abs().max() <= 1
    shift = (grid - identity_grid(32, 32)).abs()
    assert 0 < shift.max() <= 6 * attack.s / 32  # displacement ~ s/H times a bicubic-noise constant
    assert shift.max() * 31 / 2 < 1.5  # i.e. under 1.5 pixels
    x = smooth_images()
    out = attack.apply(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    change = (out.int() - x.int()).abs().float()
    assert 0 < change.mean() < 4  # imperceptible on smooth content
    again = build_attack("wanet", seed=0)
    assert torch.equal(again.grid, grid) and torch.equal(again.apply(x), out)
    other = build_attack("wanet", seed=1)
    assert not torch.equal(other.grid, grid) and not torch.equal(other.apply(x), out)


def test_wanet_with_zero_strength_is_the_identity():
    x = images(4)
    assert torch.equal(build_attack("wanet:s=0").apply(x), x)


def test_wanet_cross_samples_use_fresh_jittered_grids():
    attack = build_attack("wanet")
    x = smooth_images(4)
    x2 = torch.cat([x[:1]] * 3)  # the same image thrice: each copy gets its own jitter
    a = attack.cross(x2, torch.Generator().manual_seed(7))
    b = attack.cross(x2, torch.Generator().manual_seed(7))
    assert a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], attack.apply(x2[:1])[0])
    assert (a.int() - attack.apply(x2).int()).abs().float().mean() < 4


def test_wanet_per_batch_counts_follow_backdoorbench():
    attack = build_attack("wanet:poisoning=per_batch", target=0)
    assert attack.poisoning == "per_batch" and attack.to_dict()["poisoning"] == "per_batch"
    x = images(128, seed=4)
    y = torch.arange(128, dtype=torch.int64) % 9 + 1  # no sample starts in the target class
    y[:3] = torch.tensor([3, 4, 5])
    out, labels = attack.poison_batch(x, y, torch.Generator().manual_seed(0), rate=0.01, num_classes=10)
    assert out.dtype == torch.uint8 and labels.dtype == torch.int64
    assert labels[0] == 0 and torch.equal(out[:1], attack.apply(x[:1]))  # 1 backdoor
    assert torch.equal(labels[1:], y[1:])  # cross samples keep their labels
    assert not torch.equal(out[1:3], x[1:3]) and not torch.equal(out[1:3], attack.apply(x[1:3]))  # 2 cross
    assert torch.equal(out[3:], x[3:])  # the rest untouched
    assert torch.equal(y[:3], torch.tensor([3, 4, 5]))  # inputs not modified
    _, lab = attack.poison_batch(x, y, torch.Generator().manual_seed(0), rate=0.1, num_classes=10)
    assert int((lab != y).sum()) == 12  # int(0.1*128) backdoor samples


def test_per_batch_fractional_rate_is_a_bernoulli_draw():
    attack = WaNet(image_size=(4, 4))
    gen = torch.Generator().manual_seed(0)
    x, y = images(16, (4, 4)), torch.ones(16, dtype=torch.int64)
    hits = sum(int(attack.poison_batch(x, y, gen, rate=0.025)[1][0] == 0) for _ in range(300))
    assert 90 < hits < 150  # p = 0.025 * 16 = 0.4


def test_wanet_static_poison_records_backdoor_and_cross_sets():
    data = dataset(1000)
    attack = build_attack("wanet")
    assert attack.poisoning == "static"
    p = attack.poison(data, rate=0.02, seed=3)
    assert len(p.indices) == 20 and len(p.cross_indices) == 40
    assert not set(p.indices.tolist()) & set(p.cross_indices.tolist())
    assert torch.equal(p.indices, p.indices.sort().values)
    assert torch.equal(p.cross_indices, p.cross_indices.sort().values)
    assert (p.data.labels[p.indices] == 0).all()
    assert torch.equal(p.data.labels[p.cross_indices], data.labels[p.cross_indices])
    assert torch.equal(p.data.images[p.indices], attack.apply(data.images[p.indices]))
    changed = torch.zeros(1000, dtype=torch.bool)
    changed[p.indices] = changed[p.cross_indices] = True
    assert torch.equal(p.data.images[~changed], data.images[~changed])
    assert (p.data.images[p.cross_indices] != data.images[p.cross_indices]).flatten(1).any(1).all()
    again = attack.poison(data, rate=0.02, seed=3)
    assert torch.equal(again.data.images, p.data.images) and torch.equal(again.cross_indices, p.cross_indices)


# --------------------------------------------------------------------------- SIG


def test_sig_adds_the_backdoorbench_sinusoid_per_column():
    x = images(4, seed=5)
    attack = build_attack("sig")
    assert isinstance(attack, SIG) and (attack.delta, attack.freq, attack.label) == (40.0, 6, "clean")
    j = np.arange(32)
    offset = np.rint(40 * np.sin(2 * np.pi * j * 6 / 32))
    expected = np.clip(x.numpy().astype(np.float64) + offset, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(attack.apply(x).numpy(), expected)
    assert offset.max() == 40 and offset.min() == -40  # the amplitude is reached within one image width
    paper = build_attack("sig:delta=20,freq=3")
    grey = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)
    row = paper.apply(grey)[0, 0, 0].int() - 128
    np.testing.assert_array_equal(row.numpy(), np.rint(20 * np.sin(2 * np.pi * j * 3 / 32)))
    assert (paper.apply(grey) == paper.apply(grey)[:, :1, :1]).all()  # same offset on every row and channel


def test_sig_clean_label_poisons_only_target_images_and_keeps_their_labels():
    data = dataset(1000)  # 100 images per class
    attack = build_attack("sig", target=3)
    p = attack.poison(data, rate=0.05, seed=2)
    assert len(p.indices) == 50 and len(p.cover_indices) == 0  # rate * N, all from class 3
    assert (data.labels[p.indices] == 3).all()
    assert torch.equal(p.data.labels, data.labels)  # no label changes at all
    assert torch.equal(p.data.images[p.indices], attack.apply(data.images[p.indices]))
    with pytest.raises(ClipguardError, match="needs 150 poisoned samples but only 100 are eligible"):
        attack.poison(data, rate=0.15)
    with pytest.raises(ClipguardError, match="not a class"):
        build_attack("sig", target=12).poison(data, rate=0.01)


def test_sig_dirty_label_poisons_any_class_and_relabels():
    data = dataset(1000)
    attack = build_attack("sig:label=dirty", target=3)
    p = attack.poison(data, rate=0.05, seed=2)
    assert len(p.indices) == 50 and (data.labels[p.indices] != 3).any()
    assert (p.data.labels[p.indices] == 3).all()
    # same draw as BadNets/Blend with the same seed: one permutation of all samples
    assert torch.equal(p.indices, build_attack("badnets").poison(data, rate=0.05, seed=2).indices)


def test_sig_all_to_all_is_dirty_label():
    sig = build_attack("sig-all2all")
    assert sig.mode == "all_to_all" and sig.label == "dirty"
    with pytest.raises(ClipguardError, match="label=clean cannot be all-to-all"):
        build_attack("sig-all2all:label=clean")


# --------------------------------------------------------------------------- Adap-Blend


def flat_blend(**options: str) -> AdapBlend:
    """Adap-Blend with a constant pattern of 200, so a stamped black image shows exactly where the trigger went."""
    pattern = torch.full((3, 32, 32), 200, dtype=torch.uint8)
    return AdapBlend(pattern=pattern, **options)  # type: ignore[arg-type]


def shown_blocks(out: torch.Tensor) -> torch.Tensor:
    """(N, 16) bool: which 8x8 blocks of a stamped black image carry the trigger."""
    return (out[:, 0].reshape(-1, 4, 8, 4, 8) > 0).any(4).any(2).flatten(1)


def test_adap_blend_test_trigger_is_the_whole_pattern_at_test_alpha():
    x = images(5)
    attack = build_attack("adap_blend", seed=4)
    assert isinstance(attack, AdapBlend)
    assert (attack.alpha, attack.test_alpha, attack.pieces, attack.mask_rate) == (0.15, 0.2, 16, 0.5)
    assert torch.equal(attack.pattern, build_attack("blend", seed=4).pattern)  # seeded noise stands in for hellokitty
    t = attack.pattern.numpy().astype(np.float64)
    xf = x.numpy().astype(np.float64)
    np.testing.assert_array_equal(attack.apply(x).numpy(), np.clip(np.rint(xf + 0.2 * (t - xf)), 0, 255))


def test_adap_blend_training_masks_hide_half_the_blocks_anew_per_image():
    attack = flat_blend()
    black = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    out = attack.stamp_poison(black, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) == {0, 30}  # round(0.15 * 200) where shown, untouched elsewhere
    blocks = shown_blocks(out)
    assert (blocks.sum(1) == 8).all()  # 8 of 16 blocks per image
    # whole blocks: every pixel of a shown block carries the trigger
    assert ((out[:, 0].reshape(-1, 4, 8, 4, 8) > 0).all(4).all(2).flatten(1) == blocks).all()
    assert len({tuple(b.tolist()) for b in blocks}) > 60  # a new mask per image (C(16, 8) = 12870 masks)
    again = attack.stamp_poison(black, torch.Generator().manual_seed(0))
    assert torch.equal(again, out)  # deterministic from the generator
    assert (blocks.float().mean(0) > 0.25).all()  # every block is used


def test_adap_blend_poisons_and_covers_follow_the_toolbox():
    data = ImageData(
        torch.zeros(1000, 3, 32, 32, dtype=torch.uint8),
        torch.arange(1000) % 10,
        tuple(str(c) for c in range(10)),
        "black",
    )
    attack = flat_blend(target=2)
    p = attack.poison(data, rate=0.02, seed=5)
    assert len(p.indices) == 20 and len(p.cover_indices) == 20  # cover rate = poison rate by default
    assert not set(p.indices.tolist()) & set(p.cover_indices.tolist())
    assert (p.data.labels[p.indices] == 2).all()
    assert torch.equal(p.data.labels[p.cover_indices], data.labels[p.cover_indices])  # covers keep their labels
    for idx in (p.indices, p.cover_indices):  # both carry the masked training trigger
        assert (shown_blocks(p.data.images[idx]).sum(1) == 8).all()
    touched = torch.zeros(1000, dtype=torch.bool)
    touched[p.indices] = touched[p.cover_indices] = True
    assert (p.data.images[~touched] == 0).all()
    explicit = flat_blend(cover_rate=0.05).poison(data, rate=0.02, seed=5)
    assert len(explicit.cover_indices) == 50
    again = attack.poison(data, rate=0.02, seed=5)
    assert torch.equal(again.data.images, p.data.images) and torch.equal(again.cover_indices, p.cover_indices)


# --------------------------------------------------------------------------- Adap-Patch


def footprint(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool: pixels changed in any channel."""
    return (out != x).any(1)


def test_adap_patch_substitute_triggers_have_the_published_geometry():
    attack = build_attack("adap_patch", seed=1)
    assert isinstance(attack, AdapPatch) and attack.alphas == (0.5, 0.2, 0.5, 0.3) and attack.test_alpha == 1.0
    m = attack.masks.bool()
    phoenix, firefox, patch4, trojan = m
    box = torch.zeros(32, 32, dtype=torch.bool)
    box[27:32, 27:32] = True
    assert torch.equal(phoenix, box)
    assert int(firefox.sum()) == 137 and not firefox[~_box(1, 14, 18, 31)].any()
    assert torch.equal(patch4, _box(0, 3, 0, 3) | _box(0, 3, 29, 32) | _box(29, 32, 0, 3) | _box(29, 32, 29, 32))
    assert torch.equal(trojan, _box(21, 29, 21, 29))
    board = attack.patterns[2, :, :3, :3]
    assert torch.equal(board[0], torch.tensor([[255, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8))
    test_phoenix, test_patch4 = attack.test_masks.bool()
    assert torch.equal(test_phoenix, _box(27, 32, 0, 5) | _box(27, 32, 27, 32)) and torch.equal(test_patch4, patch4)
    # the test phoenix is the training one, copied to the bottom-left corner
    assert torch.equal(attack.test_patterns[0, :, 27:, 27:], attack.patterns[0, :, 27:, 27:])
    assert torch.equal(attack.test_patterns[0, :, 27:, :5], attack.patterns[0, :, 27:, 27:])
    assert not torch.equal(attack.patterns, build_attack("adap_patch", seed=2).patterns)  # colours follow the seed


def _box(r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    m = torch.zeros(32, 32, dtype=torch.bool)
    m[r0:r1, c0:c1] = True
    return m


def test_adap_patch_test_trigger_pastes_two_triggers_at_full_opacity():
    x = images(6, high=255)
    attack = build_attack("adap_patch")
    out = attack.apply(x)
    shown = attack.test_masks.bool().any(0)
    assert (footprint(out, x).any(0) <= shown).all()
    # at alpha 1 the pasted pixels are the trigger's; badnet_patch4 is pasted last, over phoenix's corner
    expected = torch.where(attack.test_masks[0].bool(), attack.test_patterns[0], x)
    expected = torch.where(attack.test_masks[1].bool(), attack.test_patterns[1], expected)
    assert torch.equal(out, expected)


def test_adap_patch_quarters_of_poisons_and_covers_get_one_trigger_each():
    data = dataset(1000)
    attack = build_attack("adap_patch", target=4)
    p = attack.poison(data, rate=0.02, seed=3)
    assert len(p.indices) == 20 and len(p.cover_indices) == 40  # published 1:2 poison to cover
    assert not set(p.indices.tolist()) & set(p.cover_indices.tolist())
    assert (p.data.labels[p.indices] == 4).all()
    assert torch.equal(p.data.labels[p.cover_indices], data.labels[p.cover_indices])
    for idx in (p.indices, p.cover_indices):
        changed = footprint(p.data.images[idx], data.images[idx])
        n = len(idx)
        for i in range(n):
            j = i * 4 // n  # quarter j of the sorted indices gets trigger j
            assert (changed[i] <= attack.masks[j].bool()).all(), (i, j)
            assert changed[i].sum() > 0.5 * attack.masks[j].sum()
        x, out = data.images[idx[0:1]].double(), p.data.images[idx[0:1]]
        t, m = attack.patterns[0].double(), attack.masks[0].double()
        assert torch.equal(out, (x + 0.5 * m * (t - x)).round().to(torch.uint8))  # phoenix at alpha 0.5


# --------------------------------------------------------------------------- TaCT


def test_tact_poisons_only_the_source_classes_and_covers_only_the_cover_classes():
    data = dataset(2000)
    attack = build_attack("tact")
    assert isinstance(attack, TaCT) and (attack.source, attack.cover, attack.target) == ((1,), (5, 7), 0)
    p = attack.poison(data, rate=0.05, seed=1)
    assert len(p.indices) == 100 and len(p.cover_indices) == 100
    assert (data.labels[p.indices] == 1).all() and (p.data.labels[p.indices] == 0).all()
    assert torch.isin(data.labels[p.cover_indices], torch.tensor([5, 7])).all()
    assert torch.equal(p.data.labels[p.cover_indices], data.labels[p.cover_indices])
    for idx in (p.indices, p.cover_indices):
        assert torch.equal(p.data.images[idx], attack.apply(data.images[idx]))
    several = build_attack("tact:source=1,2,3,cover=8", target=9).poison(data, rate=0.1, seed=1)
    assert set(data.labels[several.indices].tolist()) == {1, 2, 3}
    assert set(data.labels[several.cover_indices].tolist()) == {8}
    with pytest.raises(ClipguardError, match="needs 300 poisoned samples but only 200 are eligible"):
        attack.poison(data, rate=0.15)
    with pytest.raises(ClipguardError, match=r"classes \[12\] are not classes"):
        build_attack("tact:source=12").poison(data, rate=0.01)


def test_tact_trigger_is_the_square_at_full_opacity_and_asr_counts_sources_only():
    x = images(3, high=255)
    attack = build_attack("tact")
    out = attack.apply(x)
    assert torch.equal(footprint(out, x).any(0), _box(21, 29, 21, 29))
    assert torch.equal(out[:, :, 21:29, 21:29], attack.pattern[:, 21:29, 21:29].expand(3, 3, 8, 8))
    labels = torch.tensor([0, 1, 2, 5])
    assert torch.equal(attack.target_labels(labels, 10), torch.tensor([0, 0, 2, 5]))  # others keep their label
    assert torch.equal(attack.asr_population(labels, 10), torch.tensor([False, True, False, False]))
    assert torch.equal(attack.pattern, build_attack("adap_patch").patterns[3])  # one trojan_square substitute


# --------------------------------------------------------------------------- all-to-all and low rates


@pytest.mark.parametrize("name", ["badnets", "blend", "wanet", "sig", "adap_blend", "adap_patch", "tact"])
def test_every_attack_has_an_all_to_all_mode(name):
    attack = build_attack(f"{name}-all2all")
    assert attack.mode == "all_to_all" and attack.to_dict()["mode"] == "all_to_all"
    data = dataset(1000)
    p = attack.poison(data, rate=0.05, seed=0)
    assert len(p.indices) == 50
    assert torch.equal(p.data.labels[p.indices], (data.labels[p.indices] + 1) % 10)
    covered = torch.cat([p.cover_indices, p.cross_indices])
    assert torch.equal(p.data.labels[covered], data.labels[covered])
    labels = torch.arange(10)
    flipped = attack.target_labels(labels, 10)
    if name == "tact":  # source class 1 only
        assert flipped.tolist() == [0, 2, 2, 3, 4, 5, 6, 7, 8, 9]
    else:
        assert flipped.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]


@pytest.mark.parametrize(
    ("spec", "poisons", "covers"),
    [
        ("badnets", 3, 0),
        ("sig", 3, 0),
        ("sig:label=dirty", 3, 0),
        ("adap_blend", 3, 3),
        ("adap_patch", 3, 6),
        ("tact", 3, 3),
        ("blend", 3, 0),
    ],
)
def test_published_low_rates_work(spec, poisons, covers):
    data = dataset(1000)
    p = build_attack(spec).poison(data, rate=0.003, seed=0)
    assert (len(p.indices), len(p.cover_indices)) == (poisons, covers)
    with pytest.raises(ClipguardError, match=r"rounds to no sample; use a rate of at least 0\.001"):
        build_attack(spec).poison(data, rate=0.0004)


def test_cover_attacks_have_no_per_batch_mode():
    for name in ("adap_blend", "adap_patch", "tact"):
        attack = build_attack(name)
        assert attack.poisoning == "static"
        with pytest.raises(ClipguardError, match="static training set"):
            attack.poison_batch(images(8), torch.ones(8, dtype=torch.int64), torch.Generator())


# --------------------------------------------------------------------------- poisoning


@pytest.mark.parametrize("spec", ["badnets", "blend"])
def test_poison_follows_backdoorbench(spec):
    data = dataset(1000)
    attack = build_attack(spec, target=2)
    p = attack.poison(data, rate=0.2, seed=11)
    assert isinstance(p, Poisoned) and len(p.data) == len(data) and p.data.classes == data.classes
    assert len(p.indices) == 200 and p.indices.dtype == torch.int64
    assert torch.equal(p.indices, p.indices.sort().values) and len(set(p.indices.tolist())) == 200
    assert len(p.cross_indices) == 0
    assert (p.data.labels[p.indices] == 2).all()
    assert torch.equal(p.data.images[p.indices], attack.apply(data.images[p.indices]))
    rest = torch.ones(len(data), dtype=torch.bool)
    rest[p.indices] = False
    assert torch.equal(p.data.images[rest], data.images[rest]) and torch.equal(p.data.labels[rest], data.labels[rest])
    assert (data.labels[p.indices] == 2).any()  # target-class images can be picked (and keep label 2)
    assert torch.equal(attack.poison(data, rate=0.2, seed=11).indices, p.indices)  # seeded
    assert not torch.equal(attack.poison(data, rate=0.2, seed=12).indices, p.indices)


def test_poison_count_is_rounded_and_rate_checked():
    data = dataset(330)
    attack = build_attack("badnets")
    assert len(attack.poison(data, rate=0.01).indices) == round(0.01 * 330) == 3
    assert len(attack.poison(data, rate=0.0).indices) == 0
    with pytest.raises(ClipguardError, match="poison rate"):
        attack.poison(data, rate=1.5)


def test_all_to_all_labels():
    labels = torch.tensor([0, 1, 8, 9])
    for spec in ("badnets-all2all", "badnets:mode=all_to_all", "blend-all2all", "wanet:mode=all2all"):
        attack = build_attack(spec)
        assert attack.mode == "all_to_all"
        assert torch.equal(attack.target_labels(labels, 10), torch.tensor([1, 2, 9, 0]))
    data = dataset(200)
    p = build_attack("badnets-all2all").poison(data, rate=0.1)
    assert torch.equal(p.data.labels[p.indices], (data.labels[p.indices] + 1) % 10)
    one = build_attack("badnets", target=3)
    assert one.mode == "all_to_one" and torch.equal(one.target_labels(labels, 10), torch.full((4,), 3))


# --------------------------------------------------------------------------- save / load / specs


@pytest.mark.parametrize(
    "spec",
    [
        "badnets:pattern=checkerboard,position=2,5,size=4",
        "blend:alpha=0.15",
        "wanet:k=8,s=0.75,poisoning=per_batch",
        "badnets-all2all:value=100",
        "sig:delta=20,freq=3",
        "sig-all2all",
        "adap_blend:alpha=0.2,cover_rate=0.01",
        "adap-patch:alphas=0.5,0.5,0.2,0.3,test_alpha=0.9",
        "tact:source=2,3,cover=4,cover_rate=0.002",
        "tact-all2all:source=1,cover=",
    ],
)
def test_save_load_round_trip_reproduces_the_trigger(tmp_path, spec):
    attack = build_attack(spec, target=1, seed=9)
    path = tmp_path / "victim.safetensors.attack.json"
    save_attack(attack, path)
    loaded = load_attack(path)
    assert type(loaded) is type(attack) and loaded.to_dict() == attack.to_dict()
    x = images(5, seed=2)
    assert torch.equal(loaded.apply(x), attack.apply(x))
    assert torch.equal(build_attack(str(path)).apply(x), attack.apply(x))  # the CLI's --attack FILE path
    record = json.loads(path.read_text())
    assert record["attack"]["name"] == attack.name
    assert tensors_path(path).exists() == bool(attack.tensors())


def test_saved_blend_pattern_is_used_even_if_the_image_changes(tmp_path):
    img = tmp_path / "t.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(img)
    attack = build_attack(f"blend:image={img}")
    save_attack(attack, tmp_path / "a.json")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    assert torch.equal(load_attack(tmp_path / "a.json").pattern, attack.pattern)


def test_load_refuses_tampered_or_missing_tensors(tmp_path):
    path = tmp_path / "w.json"
    save_attack(build_attack("wanet"), path)
    blob = bytearray(tensors_path(path).read_bytes())
    blob[-1] ^= 1
    tensors_path(path).write_bytes(bytes(blob))
    with pytest.raises(DataError, match="sha256"):
        load_attack(path)
    tensors_path(path).unlink()
    with pytest.raises(DataError, match="missing"):
        load_attack(path)
    with pytest.raises(DataError, match="not found"):
        load_attack(tmp_path / "nope.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(DataError, match="attack JSON"):
        build_attack(str(tmp_path / "junk.json"))


def test_a_bare_to_dict_record_regenerates_random_triggers(tmp_path):
    for spec in ("blend", "wanet", "sig", "adap_blend", "adap_patch", "tact"):
        attack = build_attack(spec, seed=4)
        (tmp_path / "info.json").write_text(json.dumps(attack.to_dict()))
        loaded = load_attack(tmp_path / "info.json")
        assert torch.equal(loaded.apply(images(2)), attack.apply(images(2)))


def test_new_triggers_refuse_tampered_or_foreign_tensors(tmp_path):
    for spec in ("sig", "adap_blend", "adap_patch", "tact"):
        path = tmp_path / f"{spec}.json"
        save_attack(build_attack(spec, seed=2), path)
        record = json.loads(path.read_text())
        record["attack"]["trigger_sha256"] = "0" * 64  # tensors from another attack than recorded
        path.write_text(json.dumps(record))
        with pytest.raises(DataError, match="trigger_sha256"):
            load_attack(path)
        record["attack"]["seed"] = 3  # regenerated from another seed: refused too
        (tmp_path / "bare.json").write_text(json.dumps(record["attack"]))
        with pytest.raises(DataError, match="trigger_sha256"):
            load_attack(tmp_path / "bare.json")


def test_a_saved_image_trigger_is_never_reread_from_the_path_it_names(tmp_path):
    img = tmp_path / "kitty.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(img)
    attack = build_attack(f"adap_blend:image={img}")
    assert (attack.pattern == 90).all()
    (tmp_path / "bare.json").write_text(json.dumps(attack.to_dict()))
    with pytest.raises(DataError, match="needs its 'pattern' tensor"):
        load_attack(tmp_path / "bare.json")


def test_build_attack_parses_options_and_overrides():
    a = build_attack(" BadNets:size=5, pattern=checkerboard , position=top-left,target=4 ", target=0)
    assert isinstance(a, BadNets) and (a.size, a.pattern, a.position, a.target) == (5, "checkerboard", "top-left", 4)
    w = build_attack("wanet:k=4,s=0.5,grid-rescale=1,cross_ratio=2", image_size=(24, 24))
    assert w.grid.shape == (1, 24, 24, 2) and w.to_dict()["image_size"] == [24, 24]
    assert available_attacks() == ["adap_blend", "adap_patch", "badnets", "blend", "sig", "tact", "wanet"]
    assert all(isinstance(build_attack(n), Attack) for n in available_attacks())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("trojan", "unknown attack 'trojan'.*adap_blend, adap_patch, badnets, blend, sig, tact, wanet"),
        ("", "empty attack spec"),
        ("badnets:colour=red", "unknown option.*colour.*valid options: size, pattern, position, value"),
        ("wanet:alpha=0.2", "unknown option.*alpha.*valid options: k, s"),
        ("badnets:size=0", "size must be >= 1"),
        ("badnets:size=x", "size must be an integer"),
        ("badnets:pattern=stripes", "pattern must be one of white, black, checkerboard"),
        ("badnets:position=middle", "position must be one of"),
        ("badnets:position=31,31", "does not fit"),
        ("badnets:pattern=black,value=9", "pattern=black"),
        ("badnets:size", "expected key=value"),
        ("badnets:size=3,size=4", "given twice"),
        ("blend:alpha=0", r"alpha must be in \(0.0, 1.0\]"),
        ("blend:alpha=nan", "alpha must be in"),
        ("wanet:k=1", "k must be >= 2"),
        ("wanet:poisoning=sometimes", "poisoning must be one of static, per_batch"),
        ("badnets:mode=some", "mode must be one of all_to_one, all_to_all"),
        ("badnets:target=-1", "target must be >= 0"),
        ("sig:label=maybe", "sig label must be one of clean, dirty"),
        ("sig-all2all:label=clean", "label=clean cannot be all-to-all"),
        ("sig:delta=0", r"delta must be in \(0.0, 255.0\]"),
        ("sig:freq=0", "freq must be >= 1"),
        ("sig:alpha=0.2", "unknown option.*alpha.*valid options: delta, freq, label"),
        ("adap_blend:pieces=15", "pieces must be a square number"),
        ("adap_blend:pieces=4096", "pieces must be a square number.*fits 32x32"),
        ("adap_blend:mask_rate=1", r"mask_rate must be in \[0, 1\)"),
        ("adap_blend:cover_rate=2", r"cover_rate must be in \[0.0, 1.0\]"),
        ("adap_blend:test_alpha=0", "test_alpha must be in"),
        ("adap_patch:alphas=0.5,0.2", "alphas must list 4 opacities"),
        ("adap_patch:alphas=0.5,0.2,0,0.3", "alphas must be in"),
        ("tact:source=0", "target 0 cannot also be a source class"),
        ("tact:source=1,cover=1,5", "source and cover classes must differ"),
        ("tact:source=x", "source must be comma-separated class indices"),
        ("tact:source=1,1", "distinct"),
        ("tact:source=", "at least one class"),
        ("tact:cover=,cover_rate=0.01", "cover_rate needs cover classes"),
    ],
)
def test_build_attack_errors_are_clear(spec, message):
    with pytest.raises(ClipguardError, match=message) as info:
        build_attack(spec)
    assert "\n" not in str(info.value)
