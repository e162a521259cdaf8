"""Cached features of a locked image tower stand exactly for the tower (same loss and gradients), are
never read stale (weights, transform) or half-written, and each DDP rank caches and reads its own shards."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm.data
import torch
from conftest import TINY, shapes_set
from safetensors import safe_open
from safetensors.torch import save_file

from autoglm_train.data.shards import SkipCounter, expand_shards, usable_samples
from autoglm_train.lit.feature_cache import CachedFeatures, FeatureCache, ensure_cached, tower_fingerprint
from autoglm_train.losses.infonce import infonce_loss
from autoglm_train.model.dual_encoder import DualEncoder
from autoglm_train.model.towers import ImageTower, TextTower

TRANSFORM_ARGS = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3}
TRANSFORM_ARGS["std"] = (0.5,) * 3


def transform(args=TRANSFORM_ARGS):
    return timm.data.create_transform(**args, is_training=False, crop_pct=1.0)


def locked_model(seed=0) -> DualEncoder:
    torch.manual_seed(seed)
    return DualEncoder(ImageTower("resnet18"), TextTower(40, 32, 1, 2, 16), embed_dim=16, lock_image=True)


@pytest.fixture
def shard(shapes_dir) -> str:
    return expand_shards(str(shapes_set(shapes_dir) / "train-000000.tar"))[0]


def random_resnet_file(tmp_path) -> Path:
    """A locked tower's weights as a user's file: random, of the default job's architecture (a random tower
    is not locked)."""
    weights = tmp_path / "resnet18_narrow.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model("resnet18_narrow", num_classes=0).state_dict(), str(weights))
    return weights


def build(tmp_path, model, shard, args=TRANSFORM_ARGS):
    cache = FeatureCache(tmp_path / "cache", tower_fingerprint(model.image_tower, args, "32-true"))
    tower = model.image_tower
    (entry,) = ensure_cached(cache, tower, [shard], transform(args), "captions", 100, progress=False)
    return cache, entry


def test_cached_features_give_the_same_loss_and_gradients(tmp_path, shard):
    model = locked_model()
    _, entry = build(tmp_path, model, shard)
    samples = [s for _, s in zip(range(48), usable_samples([shard], "captions", SkipCounter()), strict=False)]
    images = torch.stack([transform()(s["image"]) for s in samples])
    tokens = torch.randint(1, 40, (48, 16))
    model.train()
    results = []
    for inputs in (images, entry["features"][:48]):
        model.zero_grad()
        image_emb, text_emb, scale = model(inputs, tokens)
        loss = infonce_loss(image_emb, text_emb, image_emb, text_emb, scale)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss_images, grads_images), (loss_cached, grads_cached) = results
    assert grads_images.keys() == grads_cached.keys() and "image_proj.weight" in grads_images
    torch.testing.assert_close(loss_cached, loss_images, rtol=0, atol=1e-5)
    for name, grad in grads_images.items():
        torch.testing.assert_close(grads_cached[name], grad, rtol=0, atol=1e-5, msg=name)
    assert entry["captions"][0] == samples[0]["captions"]


def test_changed_weights_or_transform_are_a_new_cache(tmp_path, shard):
    model = locked_model()
    cache, entry = build(tmp_path, model, shard)
    again, same = build(tmp_path, locked_model(), shard)  # the same weights, built apart: read, not built
    assert again.dir == cache.dir and torch.equal(same["features"], entry["features"])
    other_weights = locked_model(seed=1)
    changed, by_weights = build(tmp_path, other_weights, shard)
    assert changed.dir != cache.dir and not torch.allclose(by_weights["features"], entry["features"])
    resized = {**TRANSFORM_ARGS, "mean": (0.4,) * 3}
    moved, by_transform = build(tmp_path, model, shard, resized)
    assert moved.dir not in (cache.dir, changed.dir)
    assert not torch.allclose(by_transform["features"], entry["features"])
    precision = tower_fingerprint(model.image_tower, TRANSFORM_ARGS, "bf16-mixed")
    assert precision != cache.dir.name


def test_a_damaged_cache_file_is_built_again(tmp_path, shard, caplog):
    model = locked_model()
    cache, entry = build(tmp_path, model, shard)
    path = cache.path(shard)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a copy cut short
    assert cache.read(shard) is None
    _, rebuilt = build(tmp_path, model, shard)
    assert "damaged" in caplog.text
    assert torch.equal(rebuilt["features"], entry["features"]) and cache.read(shard) is not None
    # a file that loads, with its header whole, but lacks feature rows is not trusted either
    meta = {"captions": json.dumps(entry["captions"]), "count": str(len(entry["captions"]))}
    save_file({"features": entry["features"][:5], "ids": entry["ids"]}, str(path), metadata=meta)
    assert cache.read(shard) is None


def test_cached_stream_is_a_seeded_permutation_per_epoch(tmp_path, shard):
    _, entry = build(tmp_path, locked_model(), shard)
    tokenizer = lambda texts: torch.tensor([[len(t)] for t in texts])  # noqa: E731
    stream = CachedFeatures([entry], tokenizer, batch_size=64, seed=3, rank=0)
    epoch0 = [b["id"] for b in stream]
    assert len(epoch0) == len(entry["ids"]) // 64
    assert [torch.equal(a, b["id"]) for a, b in zip(epoch0, stream, strict=True)] == [True] * len(epoch0)
    ids = torch.cat(epoch0)
    assert len(set(ids.tolist())) == len(ids) and set(ids.tolist()) <= set(entry["ids"].tolist())
    stream.set_epoch(1)
    assert not torch.equal(torch.cat([b["id"] for b in stream]), ids)
    batch = next(iter(stream))
    rows = [entry["ids"].tolist().index(i) for i in batch["id"].tolist()]
    torch.testing.assert_close(batch["image"], entry["features"][rows])


@pytest.mark.slow
def test_two_gloo_ranks_each_cache_and_read_their_own_shards(shapes_dir, tmp_path):
    weights = random_resnet_file(tmp_path)
    run_dir, cache_dir = tmp_path / "ddp", tmp_path / "cache"
    env = {**os.environ, "AUTOGLM_DATA_DIR": str(shapes_dir), "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "autoglm_train", *TINY, "trainer=ddp_cpu", "model.lock_image=true"]
    args += [f"model.image_tower.checkpoint={weights}", "model.cache_locked_features=true"]
    args += [f"paths.feature_cache_dir={cache_dir}", "trainer.max_steps=4", "eval.zeroshot.task=null"]
    args += [f"hydra.run.dir={run_dir}"]
    done = subprocess.run(
        args, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["train/steps"] == 4
    built = {}
    for path in cache_dir.glob("*/*.safetensors"):
        with safe_open(path, "pt") as f:
            built[Path(f.metadata()["shard"]).name] = f.metadata()["built_by"]
    # three training shards: rank 0 takes the first and third, rank 1 the second
    assert built == {
        "train-000000.tar": "rank 0 of 2",
        "train-000001.tar": "rank 1 of 2",
        "train-000002.tar": "rank 0 of 2",
    }


@pytest.mark.slow
def test_a_cache_built_ahead_is_read_by_training(tiny_cfg, tmp_path, caplog):
    from autoglm_train import cache_features, train

    weights = random_resnet_file(tmp_path)
    overrides = ["model.lock_image=true", f"model.image_tower.checkpoint={weights}"]
    overrides += ["model.cache_locked_features=true", f"paths.feature_cache_dir={tmp_path / 'cache'}"]
    overrides += ["trainer.max_steps=3", "eval.zeroshot.task=null", "logger=none"]
    built = cache_features.run(tiny_cfg(*overrides, output_dir=tmp_path / "cache_run"))
    assert built["shards"] == 3 and len(list(Path(built["dir"]).glob("*.safetensors"))) == 3
    caplog.set_level("INFO", logger="autoglm_train.lit.feature_cache")
    metrics = train.run(tiny_cfg(*overrides))
    assert f"feature cache {built['dir']}: 3 shard(s) read, 0 built" in caplog.text
    assert metrics["train/steps"] == 3


@pytest.mark.slow
def test_resume_from_the_cache_continues_exactly_across_an_epoch_boundary(tiny_cfg, tmp_path):
    import csv

    from autoglm_train import train

    weights = random_resnet_file(tmp_path)
    # 3,000 cached samples / batch 64 = 46 batches an epoch: step 50 is 4 batches into epoch 1
    common = ["model.lock_image=true", f"model.image_tower.checkpoint={weights}"]
    common += ["model.cache_locked_features=true", f"paths.feature_cache_dir={tmp_path / 'cache'}"]
    common += ["trainer.max_steps=54", "trainer.val_check_interval=54", "trainer.log_every_n_steps=1"]
    common += ["eval.zeroshot.task=null", "callbacks.last_checkpoint.every_n_train_steps=50"]
    common += ["callbacks.last_checkpoint.filename='at-{step}'"]
    train.run(tiny_cfg(*common, output_dir=tmp_path / "straight"))
    checkpoint = tmp_path / "straight" / "checkpoints" / "at-step=50.ckpt"
    train.run(tiny_cfg(*common, f"ckpt_path='{checkpoint}'", output_dir=tmp_path / "resumed"))

    def losses(run: str) -> dict[int, float]:
        with open(tmp_path / run / "csv" / "metrics.csv") as f:
            return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}

    straight, resumed = losses("straight"), losses("resumed")
    after = sorted(s for s in resumed if s >= 50)
    assert len(after) == 4 and all(abs(straight[s] - resumed[s]) <= 1e-6 for s in after), (straight, resumed)
