"""Composition shared by the entry points (train, evaluate, compress): which model family a config
names, whether its weights are here, its tokenizer, the model sized by that tokenizer."""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from functools import partial
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from autoglm_train.data.shards import iter_captions
from autoglm_train.data.tokenizer import CaptionTokenizer, tokenizer_from_json, train_bpe
from autoglm_train.distributed.launch import made_once_per_launch
from autoglm_train.model.weights import load_checkpoint

log = logging.getLogger(__name__)


def model_family(model_cfg: DictConfig) -> str:
    """``open_clip`` | ``hf`` (a Hugging Face text tower) | ``ours`` (our transformer and BPE)."""
    if str(model_cfg.get("_target_", "")).endswith("open_clip_model"):
        return "open_clip"
    text = model_cfg.get("text_tower") or {}
    return "hf" if str(text.get("_target_", "")).endswith("HFTextTower") else "ours"


def check_model_weights(model_cfg: DictConfig) -> None:
    """Every weight the model config names exists here (or downloads), checked before data generation."""
    family = model_family(model_cfg)
    if family == "open_clip":
        from autoglm_train.model.open_clip import check_open_clip_weights

        check_open_clip_weights(model_cfg.name, model_cfg.pretrained, model_cfg.get("model_config"))
        return
    image = model_cfg.image_tower
    if model_cfg.get("lock_image") and not (image.get("pretrained") or image.get("checkpoint")):
        raise ValueError(
            "model.lock_image=true would freeze a randomly initialised image tower: give "
            "model.image_tower.checkpoint=PATH (a checkpoint of ours, e.g. from make train, or a "
            ".safetensors/.pth/.bin file) or model.image_tower.pretrained=true"
        )
    from autoglm_train.model.towers import check_image_weights

    check_image_weights(image.name, bool(image.get("pretrained")), image.get("checkpoint"))
    if family == "hf":
        from autoglm_train.model.hf_text import check_hf_weights

        check_hf_weights(model_cfg.text_tower.name, model_cfg.text_tower.pretrained)


def build_tokenizer(cfg: DictConfig, model_cfg: DictConfig, train_shards, caption_key: str, ckpt_path):
    """From the checkpoint being resumed; else the text tower's own (Hugging Face, open_clip); else
    ``tokenizer.path``; else a BPE trained on the training captions."""
    if ckpt_path:
        # mmap: only the tokenizer entry is read, not gigabytes of weights
        saved = load_checkpoint(ckpt_path, mmap=True).get("tokenizer_json")
        if saved:
            return tokenizer_from_json(saved, cfg.context_length)
    family = model_family(model_cfg)
    if family == "open_clip":
        from autoglm_train.data.open_clip_tokenizer import OpenCLIPTokenizer

        return OpenCLIPTokenizer(model_cfg.name, cfg.context_length, model_cfg.get("model_config"))
    if family == "hf":
        return CaptionTokenizer.from_pretrained(model_cfg.text_tower.name, cfg.context_length)
    if cfg.path:
        return CaptionTokenizer.from_file(cfg.path, cfg.context_length)
    start = time.perf_counter()
    texts = iter_captions(train_shards, caption_key, limit=cfg.train_samples)
    tokenizer = train_bpe(texts, cfg.vocab_size, cfg.context_length, cfg.min_frequency)
    log.info(
        "trained a BPE tokenizer (%d tokens) in %.1fs", tokenizer.vocab_size, time.perf_counter() - start
    )
    return tokenizer


def build_run_tokenizer(
    cfg: DictConfig, model_cfg: DictConfig, train_shards, caption_key: str, ckpt_path, path: str | Path
):
    """``build_tokenizer`` once per run: rank 0 builds it (a BPE is trained on rank 0 alone) and writes it
    to ``path`` (the run's ``tokenizer.json``); the other ranks wait for that file and read it, so every
    rank holds the same tokenizer and no two write the file at once."""
    built = []

    def build_and_save(tmp: Path) -> None:
        built.append(build_tokenizer(cfg, model_cfg, train_shards, caption_key, ckpt_path))
        built[0].save(tmp)

    inputs = (OmegaConf.to_yaml(cfg), OmegaConf.to_yaml(model_cfg), train_shards, caption_key, ckpt_path)
    inputs_key = hashlib.sha256(repr(inputs).encode()).hexdigest()[:16]
    text = made_once_per_launch(path, build_and_save, inputs_key)
    # rank 0 keeps the object it built (what a single-process run always had); the others read its JSON,
    # as a resumed run reads a checkpoint's
    return built[0] if built else tokenizer_from_json(text, cfg.context_length)


def build_model(model_cfg: DictConfig, tokenizer):
    """The configured model, its text tower sized by the tokenizer (vocabulary, padding id)."""
    model_cfg = copy.deepcopy(model_cfg)
    with open_dict(model_cfg):
        text = model_cfg.get("text_tower")
        if text is not None and "vocab_size" in text.keys():
            text.vocab_size = tokenizer.vocab_size
        if text is not None and "pad_id" in text.keys():
            text.pad_id = tokenizer.pad_id
    return instantiate(model_cfg)


def build_objective(loss_cfg: DictConfig, model, seed: int = 0):
    """The configured loss terms, and the itm term (losses/itm.py) where the model has a fusion stage;
    ``loss.weights.itm`` weighs it (null: 1)."""
    objective_cfg = copy.deepcopy(loss_cfg.objective)
    if getattr(model, "fusion", None) is not None:
        with open_dict(objective_cfg):
            objective_cfg.terms.itm = {"_target_": "autoglm_train.losses.itm.ITMLoss", "seed": seed}
    return instantiate(objective_cfg)


def split_optimizer_config(cfg: DictConfig) -> tuple[DictConfig, float, float]:
    """The optimizer's arguments, less ours: layer-wise learning-rate decay per tower."""
    opt = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(opt):
        image_decay = float(opt.pop("image_layer_decay", 1.0) or 1.0)
        text_decay = float(opt.pop("text_layer_decay", 1.0) or 1.0)
    return opt, image_decay, text_decay


def without_weights(model_cfg: DictConfig) -> DictConfig:
    """The architecture alone: the checkpoint holds the weights, so nothing is downloaded or read twice."""
    family = model_family(model_cfg)
    model_cfg = copy.deepcopy(model_cfg)
    with open_dict(model_cfg):
        if family == "open_clip":
            # the tag decides details of the architecture (QuickGELU, preprocessing): keep it, read nothing
            model_cfg.load_weights = False
            return model_cfg
        model_cfg.image_tower.pretrained = False
        model_cfg.image_tower.checkpoint = None
        if family == "hf":
            model_cfg.text_tower.pretrained = False  # its config.json is still read (name or directory)
    return model_cfg


def build_zeroshot(cfg: DictConfig, data_cfg: DictConfig | None = None):
    """``eval.zeroshot`` as ``LabelledImages`` for eval/zeroshot.py: the shapes set's shape and colour
    tasks (rendered at the run's image size: ``data.prepare.image_size``, else ``data.image_size``), an
    image folder or labelled shards with class names and prompt templates."""
    from autoglm_train.data import labelled
    from autoglm_train.eval.zeroshot import LabelledImages, ZeroShotTask

    templates = list(cfg.templates)
    if cfg.task == "shapes":
        from autoglm_train.data.shapes_zeroshot import SHAPES_TASKS, TASK_TOPK, shapes_zeroshot_batches

        data_cfg = data_cfg or {}
        image_size = (data_cfg.get("prepare") or {}).get("image_size") or data_cfg.get("image_size") or 64
        tasks = [
            ZeroShotTask(
                f"zeroshot/{name}_", *SHAPES_TASKS[name], topk=topk, report=tuple(f"top{k}" for k in topk)
            )
            for name, topk in TASK_TOPK.items()
        ]
        return LabelledImages(partial(shapes_zeroshot_batches, image_size=int(image_size)), tasks)
    if cfg.task == "folder":
        if not cfg.root:
            raise ValueError("eval.zeroshot.task=folder needs eval.zeroshot.root (root/<class>/*.jpg)")
        folders = list(cfg.classnames or labelled.image_folder_classes(cfg.root))
        task = ZeroShotTask("zeroshot/", labelled.prompt_names(folders), templates)
        return LabelledImages(partial(labelled.image_folder_batches, cfg.root, classes=folders), [task])
    if cfg.task == "shards":
        if not (cfg.shards and cfg.classnames):
            raise ValueError("eval.zeroshot.task=shards needs eval.zeroshot.shards and .classnames")
        classnames = list(cfg.classnames)
        batches = partial(
            labelled.labelled_shard_batches, cfg.shards, classnames=classnames, label_key=cfg.label_key
        )
        return LabelledImages(batches, [ZeroShotTask("zeroshot/", classnames, templates)])
    raise ValueError(f"eval.zeroshot.task must be null, shapes, folder or shards, not {cfg.task!r}")
