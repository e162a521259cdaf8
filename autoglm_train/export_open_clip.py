"""A checkpoint of a ``model=open_clip`` run back to open_clip's own format.

    python -m autoglm_train.export_open_clip ckpt=outputs/.../checkpoints/last.ckpt [out=model.pt]

Writes the weights under open_clip's key names (default ``<run dir>/open_clip_<name>.pt``) and prints the
open_clip lines that load them; no code of ours is needed to use the file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from autoglm_train.compress.load import load_trained, run_dir_of
from autoglm_train.distributed.fsdp import is_checkpoint
from autoglm_train.model.lora import merge_
from autoglm_train.model.open_clip import export_open_clip_state_dict, open_clip_load_call, open_clip_spec
from autoglm_train.model.weights import load_checkpoint
from autoglm_train.utils.checkpoint_files import verify_checkpoint

OPEN_CLIP_TARGET = "autoglm_train.model.open_clip.open_clip_model"
ARGS = ("ckpt", "out")
USAGE = "usage: python -m autoglm_train.export_open_clip ckpt=PATH [out=PATH]"


def parse_args(argv: list[str]) -> dict[str, str]:
    args = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in ARGS or not value:
            raise ValueError(f"unexpected argument {item!r}; {USAGE}")
        args[key] = value
    if "ckpt" not in args:
        raise ValueError(f"ckpt=PATH is required; {USAGE}")
    return args


def check_trained_with_open_clip(ckpt: Path) -> None:
    """Refuse, before loading any weights, a checkpoint whose run did not use ``model=open_clip``."""
    if not is_checkpoint(ckpt):
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    verify_checkpoint(ckpt)  # a damaged file is refused as such, before anything else is said about it
    cfg = OmegaConf.load(run_dir_of(ckpt) / ".hydra" / "config.yaml")
    target = OmegaConf.select(cfg, "model._target_")
    if target != OPEN_CLIP_TARGET:
        raise ValueError(
            f"{ckpt} was trained with model._target_={target}, not model=open_clip: only open_clip models "
            "have an open_clip form (python -m autoglm_train.compress exports ours)"
        )


def trained_logit_bias(ckpt: Path) -> torch.Tensor | None:
    """A SigLIP loss's learned bias, kept beside the model in the checkpoint (None without one)."""
    state = load_checkpoint(ckpt, mmap=True).get("state_dict", {})
    biases = [v for k, v in state.items() if k.endswith(".logit_bias") and not k.startswith("model.")]
    return biases[0].detach().reshape(-1)[0] if biases else None


def export_checkpoint(ckpt: str | Path, out: str | Path | None = None) -> tuple[Path, str]:
    """Write the open_clip state dict of ``ckpt``; returns its path and the Python that loads it."""
    ckpt = Path(ckpt)
    check_trained_with_open_clip(ckpt)
    trained = load_trained(ckpt)
    spec = open_clip_spec(trained.model)
    out = Path(out) if out else trained.run_dir / f"open_clip_{spec.name}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    model = merge_(trained.model)  # LoRA adapters folded in: open_clip's own keys and modules
    torch.save(export_open_clip_state_dict(model, trained_logit_bias(ckpt)), out)
    return out, open_clip_load_call(spec, out.resolve())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    try:
        out, load_call = export_checkpoint(**parse_args(argv))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}\nload it with:\n" + "\n".join(f"    {line}" for line in load_call.splitlines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
