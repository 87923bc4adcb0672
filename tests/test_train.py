"""``clipguard train`` provenance: which samples were poisoned and which are covers, and clean victims.

Two epochs of SmallCNN on 200 synthetic images per test: the point is what gets written, not the model.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from clipguard.attacks import build_attack, load_attack
from clipguard.data import ImageData, load_data, save_npz
from clipguard.train import attack_path, train_victim


def _npz(tmp_path, n: int = 200):
    g = torch.Generator().manual_seed(0)
    data = ImageData(
        torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
        torch.arange(n) % 10,
        tuple(str(c) for c in range(10)),
        "synthetic",
    )
    return data, save_npz(data, tmp_path / "train.npz")


def _train(tmp_path, ref, **kwargs) -> tuple[dict, dict]:
    out = tmp_path / "victim.safetensors"
    summary = train_victim(
        arch="small_cnn",
        data=str(ref),
        out=out,
        epochs=2,
        batch_size=32,
        augment=False,
        device="cpu",
        cache_dir=tmp_path / "cache",
        save_data=tmp_path / "seen.npz",
        seed=3,
        **kwargs,
    )
    return summary, json.loads(out.with_name(out.name + ".json").read_text())


def test_provenance_lists_poisons_and_covers_and_the_data_matches(tmp_path):
    data, ref = _npz(tmp_path)
    summary, info = _train(tmp_path, ref, attack="tact:source=1,cover=5,7", poison_rate=0.05)
    expected = build_attack("tact:source=1,cover=5,7", seed=3).poison(data, rate=0.05, seed=3)
    poisoning = info["poisoning"]
    assert poisoning["indices"] == expected.indices.tolist() and poisoning["poisoned"] == 10
    assert poisoning["cover_indices"] == expected.cover_indices.tolist() and poisoning["covers"] == 10
    assert summary["poisoning"] == {"mode": "static", "rate": 0.05, "poisoned": 10, "covers": 10}
    seen = load_data(tmp_path / "seen.npz")
    idx, cover = torch.tensor(poisoning["indices"]), torch.tensor(poisoning["cover_indices"])
    assert (data.labels[idx] == 1).all() and (seen.labels[idx] == 0).all()
    assert torch.equal(seen.labels[cover], data.labels[cover])  # covers keep their labels ...
    attack = load_attack(attack_path(tmp_path / "victim.safetensors"))
    assert torch.equal(seen.images[cover], attack.apply(data.images[cover]))  # ... and carry the trigger
    assert info["attack"]["name"] == "tact" and info["attack"]["source"] == [1]


def test_a_clean_victim_has_no_attack_and_no_poisoning(tmp_path):
    data, ref = _npz(tmp_path)
    summary, info = _train(tmp_path, ref, attack=None)
    assert "poisoning" not in info and "attack" not in info and summary["poisoning"] is None
    assert not attack_path(tmp_path / "victim.safetensors").exists()
    np.testing.assert_array_equal(load_data(tmp_path / "seen.npz").images.numpy(), data.images.numpy())


def test_a_run_of_exactly_four_steps_trains(tmp_path):
    # 128 images in batches of 32: 4 steps, where the one-cycle warm-up (25%) would end on the step it starts at
    _data, ref = _npz(tmp_path, n=128)
    out = tmp_path / "victim.safetensors"
    train_victim(
        arch="small_cnn",
        data=str(ref),
        out=out,
        epochs=1,
        batch_size=32,
        augment=False,
        device="cpu",
        cache_dir=tmp_path / "cache",
        seed=3,
    )
    assert json.loads(out.with_name(out.name + ".json").read_text())["train"]["epochs"] == 1
