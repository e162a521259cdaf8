"""The compression job: load a trained dual encoder, prune it (iteratively, each step followed by a
distilled fine-tune), quantize it to int8, export every variant, and report them side by side."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from rich.console import Console

from autoglm_train.compress import prune as pruning
from autoglm_train.compress.export import export_model
from autoglm_train.compress.load import load_trained
from autoglm_train.compress.lowrank import factorize_heads
from autoglm_train.compress.quantize import quantize_model
from autoglm_train.compress.recover import evaluate, finetune, frozen_copy
from autoglm_train.compress.report import count_flops, file_size, markdown_table, measure_latency, sweep_plot
from autoglm_train.config_check import check_compress_config
from autoglm_train.losses.infonce import infonce_loss
from autoglm_train.utils.files import atomic_write_text

log = logging.getLogger(__name__)
console = Console()


def build_data(trained, cfg: DictConfig):
    data_cfg = copy.deepcopy(trained.cfg.data)
    with open_dict(data_cfg):
        data_cfg.batch_size = cfg.finetune.batch_size
        data_cfg.num_workers = cfg.data.num_workers
    datamodule = instantiate(data_cfg)
    datamodule.prepare_data()
    datamodule.attach(
        trained.tokenizer, trained.model.image_tower.data_config, trim_text=trained.model.text_trims_padding
    )
    return datamodule


def step_ratios(ratio: float, iterations: int) -> list[float]:
    """Per-step ratios of what remains, so that ``iterations`` steps remove ``ratio`` of the original."""
    keep = (1.0 - ratio) ** (1.0 / iterations)
    return [1.0 - keep] * iterations


def prune_once(model, ratio: float, cfg: DictConfig, calibration: list[dict]) -> dict:
    taylor = cfg.prune.importance == "taylor"
    if taylor:

        def loss_fn(m, batch):
            image, text = m.encode_image(batch["image"]), m.encode_text(batch["text"])
            return infonce_loss(image, text, image, text, m.logit_scale())

        pruning.accumulate_grads(model, loss_fn, calibration)
    report = pruning.prune_model(
        model,
        ratio,
        importance=cfg.prune.importance,
        scope=cfg.prune.scope,
        targets=tuple(cfg.prune.targets),
        grads_available=taylor,
    )
    model.zero_grad(set_to_none=True)
    return report


def pruned_copy(original, ratio: float, cfg: DictConfig, calibration: list[dict]):
    model = copy.deepcopy(original)  # prune_model converts its text tower (exactly) before cutting heads
    prune_once(model, ratio, cfg, calibration)
    return model


def recover(student, teacher, steps: int, cfg: DictConfig, datamodule, desc: str) -> None:
    """Fine-tune ``student`` on the training stream, distilled from ``teacher`` when there is one."""
    finetune(
        student,
        datamodule._loader(train=True),
        steps,
        lr=cfg.finetune.lr,
        teacher=teacher,
        kl_weight=cfg.finetune.kl_weight,
        mse_weight=cfg.finetune.mse_weight,
        progress=cfg.progress_bar,
        desc=desc,
    )


def prune_and_recover(original, teacher, cfg: DictConfig, datamodule, calibration: list[dict]):
    """(one-shot pruned without recovery, iteratively pruned + fine-tuned)."""
    one_shot = pruned_copy(original, cfg.prune.ratio, cfg, calibration)
    steps = step_ratios(cfg.prune.ratio, cfg.prune.iterations)
    per_step = cfg.finetune.steps // len(steps)
    student = copy.deepcopy(original)
    for i, ratio in enumerate(steps):
        prune_once(student, ratio, cfg, calibration)
        recover(student, teacher, per_step, cfg, datamodule, f"prune step {i + 1}/{len(steps)}: fine-tune")
    return one_shot.eval(), student.eval()


def describe(name, model, source, val_batches, export_dir, example, tokenizer, preprocess) -> dict:
    metrics = evaluate(model, val_batches)
    export_model(model, tokenizer, export_dir, preprocess, example["images"])
    is_float = model is source
    return {
        "variant": name,
        "params": pruning.count_params(source),
        "file_bytes": file_size(export_dir),
        "flops": count_flops(model, example["images"], example["tokens"]) if is_float else None,
        **metrics,
    }


def run(cfg: DictConfig) -> dict:
    check_compress_config(cfg)  # every bad value at once, before the checkpoint is loaded
    L.seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]Run directory:[/bold] {out}")
    trained = load_trained(cfg.ckpt)
    datamodule = build_data(trained, cfg)
    val_batches = list(datamodule.val_dataloader())
    train_stream = iter(datamodule._loader(train=True))
    calibration = [next(train_stream) for _ in range(max(cfg.prune.calibration_batches, 1))]
    quant_images = [next(train_stream)["image"] for _ in range(max(cfg.quantize.calibration_batches, 1))]
    n = cfg.report.latency_batch
    example = {
        "images": val_batches[0]["image"][:n].repeat(-(-n // len(val_batches[0]["image"])), 1, 1, 1)[:n],
        "tokens": val_batches[0]["text"][:n],
    }
    preprocess = datamodule.eval_transform_args
    original = trained.model.eval()

    teacher = frozen_copy(original) if cfg.finetune.distill else None

    float_variants = {"original": original}
    if cfg.lowrank_heads.enabled:
        name, factorized = lowrank_variant(original, teacher, cfg, datamodule)
        float_variants[name] = factorized
    if cfg.prune.enabled:
        one_shot, recovered = prune_and_recover(original, teacher, cfg, datamodule, calibration)
        float_variants["pruned"] = one_shot
        float_variants["pruned + distilled" if cfg.finetune.distill else "pruned + fine-tuned"] = recovered
    variants = {name: (m, m) for name, m in float_variants.items()}
    if cfg.quantize.enabled:
        variants["int8"] = (quantize_model(original, quant_images), original)
        if cfg.prune.enabled:
            last = list(float_variants)[-1]
            variants[f"{last} + int8"] = (
                quantize_model(float_variants[last], quant_images),
                float_variants[last],
            )

    rows = []
    for name, (model, source) in variants.items():
        export_dir = out / "exports" / name.replace(" + ", "_").replace(" ", "_")
        rows.append(
            describe(name, model, source, val_batches, export_dir, example, trained.tokenizer, preprocess)
        )
        console.print(f"{name}: val/r1_mean {rows[-1]['val/r1_mean']:.4f}")
    latency = measure_latency(
        {name: model for name, (model, _) in variants.items()},
        example["images"],
        example["tokens"],
        cfg.report.repeats,
    )
    for row in rows:
        row["latency_s"] = latency[row["variant"]]

    sweep = [
        sweep_point(original, teacher, ratio, cfg, datamodule, calibration, val_batches, example)
        for ratio in cfg.report.sweep_ratios
    ]
    report = {
        "ckpt": str(cfg.ckpt),
        "threads": torch.get_num_threads(),
        "latency_batch": n,
        "rows": rows,
        "sweep": sweep,
    }
    table = markdown_table(rows)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    text = f"# Compression report\n\nCheckpoint: `{cfg.ckpt}`\n\n{table}\n"
    if sweep:
        sweep_plot(sweep, out / "pruning_sweep.png")
        text += "\n![pruning sweep](pruning_sweep.png)\n"
    atomic_write_text(out / "report.md", text)
    console.print(table)
    console.print(f"[bold]Run directory:[/bold] {out}")
    return report


def lowrank_variant(original, teacher, cfg: DictConfig, datamodule):
    """Heads factorized by SVD (at ``rank``, or at ``energy`` when rank is null), then recovered."""
    model = copy.deepcopy(original)
    spec = cfg.lowrank_heads
    ranks = factorize_heads(model, spec.rank, None if spec.rank is not None else spec.energy)
    if spec.finetune_steps:
        recover(model, teacher, spec.finetune_steps, cfg, datamodule, "low-rank heads: fine-tune")
    label = "/".join(str(r) for r in ranks.values())
    return f"heads rank {label}" + (" + distilled" if spec.finetune_steps and teacher else ""), model.eval()


def sweep_point(original, teacher, ratio, cfg, datamodule, calibration, val_batches, example) -> dict:
    model = pruned_copy(original, ratio, cfg, calibration)
    recover(model, teacher, cfg.report.sweep_finetune_steps, cfg, datamodule, f"sweep ratio {ratio}")
    latency = measure_latency(
        {"original": original, "pruned": model}, example["images"], example["tokens"], repeats=5
    )
    return {
        "ratio": float(ratio),
        "params": pruning.count_params(model),
        **evaluate(model, val_batches),
        "speedup": latency["original"] / latency["pruned"],
    }
