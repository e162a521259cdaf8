"""A trained dual encoder back from its checkpoint: the run directory's composed config rebuilds the model,
the checkpoint holds the weights and the tokenizer.

Both files may come from someone else. The checkpoint is read with torch's weights-only unpickler
(``model.weights.load_checkpoint``), and the config may name only callables of the libraries a model is
made of: Hydra would instantiate any ``_target_`` it names (``os.system`` as readily as a tower).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from autoglm_train.build import build_model, without_weights
from autoglm_train.data.tokenizer import CaptionTokenizer, tokenizer_from_json
from autoglm_train.distributed.fsdp import is_checkpoint
from autoglm_train.model.dual_encoder import DualEncoder
from autoglm_train.model.weights import load_checkpoint, model_weights

# what a run's config may instantiate: our code, the libraries towers come from, and Lightning (every run's
# config names its Trainer, checkpoint callbacks and logger, though loading instantiates none of them)
ALLOWED_TARGET_PREFIXES = (
    "autoglm_train.",
    "timm.",
    "transformers.",
    "open_clip.",
    "torch.",
    "lightning.pytorch.",
)
# ... less what, inside those, reads pickles or fetches and runs code
REFUSED_TARGET_PREFIXES = (
    "torch.load",
    "torch.hub.",
    "torch.jit.load",
    "torch.package.",
    "torch.utils.cpp_extension.",
    "torch.serialization.",
)


class UnsafeConfigError(ValueError):
    """A run directory's config that would instantiate something other than a model's parts."""


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
    if not is_checkpoint(ckpt):
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    run_dir = run_dir_of(ckpt)
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)  # was ${hydra:runtime.output_dir}, unknown outside that run
    OmegaConf.resolve(cfg)  # parts of it are instantiated alone, away from the keys they point to
    check_targets(cfg, run_dir / ".hydra" / "config.yaml")
    state = load_checkpoint(ckpt)
    tokenizer = tokenizer_from_json(state["tokenizer_json"], cfg.tokenizer.context_length)
    model = build_model(without_weights(cfg.model), tokenizer)
    model.load_state_dict(model_weights(state["state_dict"]))
    return Trained(model.eval(), tokenizer, cfg, run_dir)


def check_targets(cfg: DictConfig, source: Path) -> None:
    """Refuse, before anything is instantiated, a config naming a ``_target_`` outside our code and the
    model libraries, or code-running remote models (``trust_remote_code``). Checked after resolving, so an
    interpolation cannot assemble a target the check did not see."""
    for key, value in walk(cfg):
        name = key.rsplit(".", 1)[-1]
        if name == "_target_" and not allowed_target(str(value)):
            raise UnsafeConfigError(
                f"{source}: {key}={value} is not a class or function of "
                f"{', '.join(p.rstrip('.') for p in ALLOWED_TARGET_PREFIXES)} (or it reads pickles or "
                "runs fetched code); refusing to instantiate it from a run directory's config"
            )
        if name == "trust_remote_code" and value:
            raise UnsafeConfigError(f"{source}: {key}={value} would run code fetched from the hub; refused")


def allowed_target(target: str) -> bool:
    return target.startswith(ALLOWED_TARGET_PREFIXES) and not target.startswith(REFUSED_TARGET_PREFIXES)


def walk(node, prefix: str = "") -> Iterator[tuple[str, object]]:
    """``(dotted key, value)`` of every leaf of a config, lists included (``callbacks.0._target_``)."""
    if isinstance(node, DictConfig | ListConfig):
        node = OmegaConf.to_container(node, throw_on_missing=False)
    if isinstance(node, dict):
        items = ((str(k), v) for k, v in node.items())
    elif isinstance(node, list):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        yield prefix, node
        return
    for key, child in items:
        yield from walk(child, f"{prefix}.{key}" if prefix else key)
