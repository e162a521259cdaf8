"""Files handed to us run no code: checkpoints are read with the weights-only unpickler, and a run
directory's config may instantiate only a model's parts."""

import os
import shlex
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from autoglm_train.build import build_tokenizer
from autoglm_train.compress.load import UnsafeConfigError, load_trained
from autoglm_train.data.tokenizer import train_bpe
from autoglm_train.export_open_clip import trained_logit_bias
from autoglm_train.model.weights import UnsafeCheckpointError, load_checkpoint, read_state_dict


class Payload:
    """Unpickling it would run a shell command; here a harmless one that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture
def tokenizer_json():
    return train_bpe(["a red circle", "a blue square"] * 10, 100, 8, min_frequency=1).to_json()


@pytest.fixture
def run_dir(tmp_path, tokenizer_json):
    """A run directory as training leaves it: a config that rebuilds a tiny model, and a checkpoint."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    cfg = {
        "paths": {"output_dir": "${hydra:runtime.output_dir}"},
        "tokenizer": {"context_length": 8},
        "model": {
            "_target_": "autoglm_train.model.dual_encoder.DualEncoder",
            "image_tower": {"_target_": "autoglm_train.model.towers.ImageTower", "name": "resnet18"},
            "text_tower": {
                "_target_": "autoglm_train.model.towers.TextTower",
                "vocab_size": 0,
                "width": 32,
                "depth": 1,
                "heads": 2,
                "context_length": 8,
            },
            "embed_dim": 16,
        },
        "trainer": {"_target_": "lightning.pytorch.Trainer"},
    }
    OmegaConf.save(OmegaConf.create(cfg), run / ".hydra" / "config.yaml")
    return run


def save_malicious(path: Path, tokenizer_json: str) -> Path:
    marker = path.parent / "payload-ran"
    torch.save({"state_dict": {}, "tokenizer_json": tokenizer_json, "extra": Payload(marker)}, path)
    return marker


def refused(call, path: Path):
    with pytest.raises(UnsafeCheckpointError) as caught:
        call()
    message = str(caught.value)
    assert str(path) in message and "posix.system" in message and "refuse to unpickle" in message


def test_a_malicious_checkpoint_is_refused_by_every_loader_and_its_payload_never_runs(
    run_dir, tokenizer_json
):
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    marker = save_malicious(ckpt, tokenizer_json)
    tokenizer_cfg = OmegaConf.create({"context_length": 8})
    model_cfg = OmegaConf.create({"_target_": "x", "text_tower": {"_target_": "y"}})
    for call in (
        lambda: load_checkpoint(ckpt),
        lambda: read_state_dict(ckpt),
        lambda: load_trained(ckpt),  # compress, evaluate ckpt=, export_open_clip
        lambda: build_tokenizer(tokenizer_cfg, model_cfg, None, "captions", ckpt),  # resuming a run
        lambda: trained_logit_bias(ckpt),  # export_open_clip's SigLIP bias
    ):
        refused(call, ckpt)
    assert not marker.exists()


def test_a_checkpoint_of_plain_data_loads_with_its_run_config(run_dir, tokenizer_json):
    import random
    from collections import Counter

    from autoglm_train.build import build_model
    from autoglm_train.data.tokenizer import tokenizer_from_json

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    model = build_model(cfg.model, tokenizer_from_json(tokenizer_json, 8))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    state = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "tokenizer_json": tokenizer_json,
        "run_state": {"random": random.getstate(), "skipped": Counter(bad_image=2)},
        "hyper_parameters": {"warmup_steps": 2, "grad_clip": None},
    }
    torch.save(state, ckpt)
    loaded = load_checkpoint(ckpt)
    assert loaded["run_state"] == {"random": random.getstate(), "skipped": Counter(bad_image=2)}
    trained = load_trained(ckpt)  # the config names Lightning's Trainer too, as every run's does
    assert trained.run_dir == run_dir.resolve() and trained.model.embed_dim == 16


@pytest.mark.parametrize(
    ("key", "target"),
    [
        ("model._target_", "os.system"),
        ("model.text_tower._target_", "builtins.eval"),
        ("x._target_", "torch.load"),
    ],
)
def test_a_run_config_naming_a_foreign_target_is_refused_naming_the_key(run_dir, tokenizer_json, key, target):
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    OmegaConf.update(cfg, key, target, force_add=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}, "tokenizer_json": tokenizer_json}, ckpt)
    with pytest.raises(UnsafeConfigError, match=rf"{key}={target} .*refusing to instantiate"):
        load_trained(ckpt)


def test_a_target_assembled_by_interpolation_is_seen(run_dir, tokenizer_json):
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    cfg.evil = {"module": "os", "_target_": "${.module}.system"}
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}, "tokenizer_json": tokenizer_json}, ckpt)
    with pytest.raises(UnsafeConfigError, match=r"evil._target_=os.system"):
        load_trained(ckpt)
