"""Released and local weights for the towers, offline first.

Released weights come from the local Hugging Face cache (what timm, ``transformers`` and open_clip download
into). When they are not there and the hub cannot be reached (``HF_HUB_OFFLINE=1``, or no network), the
error names the model, the cache looked in and how to fetch the weights on a machine that has a network.
``check_*`` functions answer that question cheaply, so a run can refuse before it generates any data.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from autoglm_train.utils.checkpoint_files import DamagedCheckpointError, verify_checkpoint

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
SHARDED_META_FILE = "meta.pt"  # beside a DCP folder's shards: the trainer's state other than weights


class MissingWeightsError(FileNotFoundError):
    """Released weights that are neither in the local cache nor downloadable from here."""


class UnsafeCheckpointError(ValueError):
    """A pickled file that would build objects other than plain weights and data (and so could run code)."""


def hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def fetch_hint(command: str) -> str:
    return (
        f"On a machine with network, run `{command}`, then copy its cache ({hub_cache()}) to the same place "
        "here, or point HF_HOME (or HF_HUB_CACHE) at the copy; set HF_HUB_OFFLINE=1 on machines without "
        "network."
    )


def cached_hub_file(repo_id: str, filenames: Sequence[str], revision: str | None = None) -> str | None:
    """The first of ``filenames`` present for ``repo_id`` in the local hub cache, else None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
        if isinstance(found, str):
            return found
    return None


def ensure_hub_files(repo_id: str, filenames: Sequence[str], what: str, command: str) -> str:
    """Path of the first of ``filenames`` in the cache; downloads when the hub is reachable. Raises
    ``MissingWeightsError`` naming ``what``, the cache and ``command`` otherwise."""
    revision = None
    if "@" in repo_id:
        repo_id, revision = repo_id.split("@", 1)
    found = cached_hub_file(repo_id, filenames, revision)
    if found:
        return found
    problem = "HF_HUB_OFFLINE=1" if hub_offline() else "the hub could not be reached"
    if not hub_offline():
        from huggingface_hub import hf_hub_download

        for filename in filenames:
            try:
                return hf_hub_download(repo_id, filename, revision=revision)
            except Exception as exc:  # no network, no such file: try the next name, then explain
                problem = f"download failed: {type(exc).__name__}"
    raise MissingWeightsError(
        f"{what}: weights not found in the Hugging Face cache {hub_cache()} "
        f"(looked for {repo_id}/{'|'.join(filenames)}; {problem}). {fetch_hint(command)}"
    )


# --- timm ---------------------------------------------------------------------------------------------
TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def check_timm_weights(name: str) -> None:
    """Raise ``MissingWeightsError`` unless timm can load released weights for ``name`` from here."""
    from timm.models import get_pretrained_cfg, is_model

    base = name.split(".", 1)[0]
    if not is_model(base):
        raise ValueError(f"model.image_tower.name={name!r} is not a timm model (see timm.list_models())")
    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ValueError(
            f"timm has no released weights for {name!r}: use model.image_tower.pretrained=false, "
            "or model.image_tower.checkpoint=PATH"
        )
    command = f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\""
    if cfg.file:
        if not Path(cfg.file).is_file():
            raise MissingWeightsError(f"timm model {name!r}: weights file {cfg.file} not found")
        return
    if cfg.hf_hub_id:
        files = (cfg.hf_hub_filename,) if getattr(cfg, "hf_hub_filename", None) else TIMM_WEIGHT_FILES
        ensure_hub_files(cfg.hf_hub_id, files, f"timm model {name!r}", command)
        return
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
    if not cached.is_file():
        raise MissingWeightsError(
            f"timm model {name!r}: weights not found in torch's hub cache ({cached}). "
            f"On a machine with network run `{command}` and copy {cached.parent} here (or set TORCH_HOME)."
        )


# --- local files ----------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path, mmap: bool = False):
    """A torch pickle (one of our checkpoints, a ``.pt``/``.pth``/``.bin`` weights file) on the CPU, read
    with torch's weights-only unpickler: a file handed to us must not run code when read.

    Our checkpoints need nothing beyond its default allow-list (tensors, numbers, strings, lists, tuples,
    dicts, ``OrderedDict``, ``Counter``, sets): Lightning's state, hyper-parameters that are numbers, the
    tokenizer as JSON text, ``random`` states as tuples. So nothing is added to it. ``mmap``: tensors are
    read only when used (the tokenizer of a large checkpoint without its weights).

    A checkpoint with a manifest is verified against it first, one without is checked for a whole zip
    directory (``utils/checkpoint_files.py``): a damaged file is refused naming what is wrong."""
    verify_checkpoint(path)
    if Path(path).is_dir():
        return load_sharded_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, zipfile.BadZipFile) as exc:
        if isinstance(exc, RuntimeError) and "PytorchStreamReader" not in str(exc):
            raise
        raise DamagedCheckpointError(f"{path} cannot be read whole ({exc}); truncated or corrupted?") from exc
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path} contains objects that are not plain weights ({', '.join(unsafe_globals(path, exc))}); "
            "we refuse to unpickle it, since unpickling them could run any code. Our own checkpoints never "
            "need this: load the file only if you trust where it came from, and convert it to plain "
            "tensors (or .safetensors) there."
        ) from exc


def load_sharded_checkpoint(path: str | Path) -> dict:
    """A sharded checkpoint (a torch DCP folder written by every rank under FSDP) as one checkpoint dict in
    memory, the weights whole: what ``python -m lightning.pytorch.utilities.consolidate_checkpoint PATH``
    writes to a file. The rest of the trainer's state (``meta.pt``, from rank 0) is read weights-only."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is a folder but not a sharded checkpoint (no .metadata file)")
    checkpoint: dict = {}
    # the empty planner fills the dict with every tensor the folder holds, whole (no process group needed)
    # (torch's own dcp_to_torch_save does this, into a file)
    _load_state_dict(checkpoint, FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    if (path / SHARDED_META_FILE).is_file():
        checkpoint.update(load_checkpoint(path / SHARDED_META_FILE))
    return checkpoint


def unsafe_globals(path: str | Path, exc: Exception) -> list[str]:
    """The globals the weights-only unpickler refused: from its message, else by scanning the file (which
    reads the pickle's opcodes and runs nothing)."""
    named = re.findall(r"GLOBAL ([\w.]+)", str(exc))
    if named:
        return list(dict.fromkeys(named))
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path) or ["unknown global"]
    except Exception:  # not a zip checkpoint: the message is all there is
        return ["unknown global"]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors``, ``.pth``/``.pt``/``.bin`` file, or of one of our Lightning
    checkpoints (``.ckpt``). Wrappers (``state_dict``, ``model``, ``module``) are unwrapped."""
    path = Path(path)
    if not (path.is_file() or (path / ".metadata").is_file()):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{path}: expected one of {', '.join(WEIGHT_SUFFIXES)}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = load_checkpoint(path, mmap=True)
    for key in ("state_dict", "model", "module", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: no state dict of tensors found")
    return state


def strip_prefix(state: dict[str, torch.Tensor], prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """Keep the keys under the first prefix that some key starts with, without it (a whole model's
    checkpoint gives one tower); keys stay as they are when none does."""
    for prefix in prefixes:
        if prefix and any(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def load_into(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    strict: bool,
    what: str,
    ignore: Sequence[str] = (),
) -> None:
    """``load_state_dict`` with a readable report. Keys starting with one of ``ignore`` (a classifier
    the tower does not have) are dropped first. Strict: any missing or unexpected key is an error;
    not strict: they are logged."""
    dropped = [k for k in state if any(k.startswith(p) for p in ignore)]
    state = {k: v for k, v in state.items() if k not in dropped}
    expected = module.state_dict()
    shape_mismatch = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if shape_mismatch:
        raise ValueError(f"{what}: shapes differ from the model: {', '.join(shape_mismatch[:5])}")
    result = module.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    report = (
        f"{len(missing)} missing ({', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}), "
        f"{len(unexpected)} unexpected ({', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''})"
    )
    if (missing or unexpected) and strict:
        raise ValueError(f"{what}: keys do not match the model: {report}; strict=false loads what matches")
    if missing or unexpected:
        log.warning("%s: loaded with strict=false: %s", what, report)
    else:
        log.info("%s: all %d tensors loaded (%d classifier tensors dropped)", what, len(state), len(dropped))


def model_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's tensors in a checkpoint of our training module (its keys under ``model.``, without it;
    the rest, e.g. a momentum copy or a queue, is the module's own)."""
    return {k[len("model.") :]: v for k, v in state_dict.items() if k.startswith("model.")}


def init_from_checkpoint(model: nn.Module, path: str | Path) -> None:
    """``init_from``: a model starts from the weights it shares with a checkpoint of ours (a second stage:
    locked towers of a trained run and a new fusion stage). What the checkpoint lacks keeps its fresh
    initialisation and is logged; a checkpoint that shares nothing with the model is refused."""
    weights = model_weights(load_checkpoint(path, mmap=True).get("state_dict") or {})
    if not weights.keys() & model.state_dict().keys():
        raise ValueError(
            f"init_from={path}: none of its weights belong to this model (is it a checkpoint of ours, of "
            "the same architecture?)"
        )
    load_into(model, weights, strict=False, what=f"init_from={path}")
