"""A trained dual encoder back from its checkpoint: the run directory's composed config rebuilds the model,
the checkpoint holds the weights and the tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from autoglm_train.build import build_model, without_weights
from autoglm_train.data.tokenizer import CaptionTokenizer, tokenizer_from_json
from autoglm_train.model.dual_encoder import DualEncoder


@dataclass
class Trained:
    model: DualEncoder
    tokenizer: CaptionTokenizer  # or an OpenCLIPTokenizer: the same interface
    cfg: DictConfig  # the training run's composed config
    run_dir: Path


def run_dir_of(ckpt: Path) -> Path:
    """``<run>/checkpoints/x.ckpt`` or ``<run>/hpc_ckpt_N.ckpt`` -> ``<run>`` (the one with ``.hydra/``)."""
    for parent in ckpt.resolve().parents:
        if (parent / ".hydra" / "config.yaml").is_file():
            return parent
    raise FileNotFoundError(
        f"{ckpt}: no .hydra/config.yaml above it; a checkpoint is read from its run directory"
    )


def load_trained(ckpt: str | Path) -> Trained:
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    run_dir = run_dir_of(ckpt)
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)  # was ${hydra:runtime.output_dir}, unknown outside that run
    OmegaConf.resolve(cfg)  # parts of it are instantiated alone, away from the keys they point to
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    tokenizer = tokenizer_from_json(state["tokenizer_json"], cfg.tokenizer.context_length)
    model = build_model(without_weights(cfg.model), tokenizer)
    weights = {k[len("model.") :]: v for k, v in state["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(weights)
    return Trained(model.eval(), tokenizer, cfg, run_dir)
