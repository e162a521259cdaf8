"""The compression job: load a trained dual encoder, prune it (iteratively, each step followed by a
distilled fine-tune), export the original and the pruned model to ONNX, quantize the graphs to int8 with
ONNX Runtime, and report every variant, PyTorch and ONNX Runtime, side by side."""

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
from autoglm_train.compress.export import export_model, graphs_size
from autoglm_train.compress.load import load_trained
from autoglm_train.compress.lowrank import factorize_heads
from autoglm_train.compress.quantize import quantize_export, read_quantization
from autoglm_train.compress.recover import evaluate, finetune, frozen_copy
from autoglm_train.compress.report import (
    count_flops,
    fidelity_tables,
    held_out_fidelity,
    markdown_table,
    measure_latency,
    sweep_plot,
)
from autoglm_train.compress.serving import OrtDualEncoder
from autoglm_train.config_check import check_compress_config
from autoglm_train.losses.infonce import infonce_loss
from autoglm_train.model.lora import merge_
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
    example = {"image": calibration[0]["image"][:2], "text": calibration[0]["text"][:2]}
    report = pruning.prune_model(
        model,
        ratio,
        example,
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


def weights_bytes(model) -> int:
    """What a PyTorch variant's weights take (its state dict: parameters and buffers)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def torch_row(name: str, model, val_batches, example) -> dict:
    return {
        "variant": name,
        "runtime": "PyTorch fp32",
        "params": pruning.count_params(model),
        "file_bytes": weights_bytes(model),
        "flops": count_flops(model, example["images"], example["tokens"]),
        **evaluate(model, val_batches),
    }


def serving_rows(name, model, flops, cfg, out: Path, trained, preprocess, example, quant_batches) -> dict:
    """``model`` exported to ONNX (fp32) and, when quantization is on, to int8: ``{row name: (row, served)}``
    where ``served`` runs the graphs on ONNX Runtime behind the encode methods."""
    slug = name.replace(" + ", "_").replace(" ", "_")
    fp32_dir = export_model(model, trained.tokenizer, out / "exports" / slug, preprocess, example["images"])
    exports = {"ORT fp32": fp32_dir}
    if cfg.quantize.enabled:
        exports["ORT int8"] = quantize_export(
            fp32_dir,
            out / "exports" / f"{slug}_int8",
            [b["image"] for b in quant_batches],
            [b["text"] for b in quant_batches],
            image_mode=cfg.quantize.image,
            text_mode=cfg.quantize.text,
            exclude=cfg.quantize.exclude if cfg.quantize.exclude == "auto" else list(cfg.quantize.exclude),
            min_cosine=cfg.quantize.min_cosine,
            selection_batches=cfg.quantize.sensitivity_batches,
            progress=cfg.progress_bar,
        )
    rows = {}
    for runtime, directory in exports.items():
        row_name = runtime if name == "original" else f"{name} + {runtime}"
        served = OrtDualEncoder(directory, threads=torch.get_num_threads())
        rows[row_name] = (
            {
                "variant": row_name,
                "runtime": f"ONNX Runtime {runtime.split()[-1]}",
                "params": pruning.count_params(model),
                "file_bytes": graphs_size(directory),
                "flops": flops if runtime == "ORT fp32" else None,  # the same graph as the PyTorch row's
                "export_dir": str(directory),
                **(
                    {"quantization": read_quantization(directory), "fp32_variant": list(rows)[0]}
                    if runtime == "ORT int8"
                    else {}
                ),
            },
            served,
        )
    return rows


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
    quant_batches = [next(train_stream) for _ in range(max(cfg.quantize.calibration_batches, 1))]
    n = cfg.report.latency_batch
    example = {
        "images": val_batches[0]["image"][:n].repeat(-(-n // len(val_batches[0]["image"])), 1, 1, 1)[:n],
        "tokens": val_batches[0]["text"][:n].repeat(-(-n // len(val_batches[0]["text"])), 1)[:n],
    }
    preprocess = datamodule.eval_transform_args
    # LoRA adapters folded into the weights: the pruner, the report and the exports see plain layers
    original = merge_(trained.model).eval()

    teacher = frozen_copy(original) if cfg.finetune.distill else None

    float_variants = {"original": original}
    if cfg.lowrank_heads.enabled:
        name, factorized = lowrank_variant(original, teacher, cfg, datamodule)
        float_variants[name] = factorized
    if cfg.prune.enabled:
        one_shot, recovered = prune_and_recover(original, teacher, cfg, datamodule, calibration)
        float_variants["pruned"] = one_shot
        float_variants["pruned + distilled" if cfg.finetune.distill else "pruned + fine-tuned"] = recovered

    rows, served, flops = [], {}, {}
    for name, model in float_variants.items():
        rows.append(torch_row(name, model, val_batches, example))
        flops[name] = rows[-1]["flops"]
        served[name] = model
        console.print(f"{name} (PyTorch): val/r1_mean {rows[-1]['val/r1_mean']:.4f}")
    # served on ONNX Runtime: the original, and the last (most compressed) float variant
    to_serve = ["original"] + ([list(float_variants)[-1]] if len(float_variants) > 1 else [])
    for name in to_serve:
        for row_name, (row, model) in serving_rows(
            name, float_variants[name], flops[name], cfg, out, trained, preprocess, example, quant_batches
        ).items():
            row.update(evaluate(model, val_batches))
            if "fp32_variant" in row:  # int8 against its own fp32 graph, on held-out data
                row["fidelity"] = held_out_fidelity(served[row["fp32_variant"]], model, val_batches)
            rows.append(row)
            served[row_name] = model
            console.print(f"{row_name}: val/r1_mean {row['val/r1_mean']:.4f}")

    for batch_size in sorted({1, n}):
        latency = measure_latency(
            served, example["images"][:batch_size], example["tokens"][:batch_size], cfg.report.repeats
        )
        for row in rows:
            row[f"latency_s_b{batch_size}"] = latency[row["variant"]]
            row[f"throughput_b{batch_size}"] = batch_size / latency[row["variant"]]
    for row in rows:
        row["latency_s"] = row[f"latency_s_b{n}"]

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
    table = markdown_table(rows, batch=n)
    fidelity = fidelity_tables(rows)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    text = f"# Compression report\n\nCheckpoint: `{cfg.ckpt}`\n\n{table}\n"
    if fidelity:
        text += f"\n## INT8 fidelity\n\n{fidelity}\n"
    if sweep:
        sweep_plot(sweep, out / "pruning_sweep.png")
        text += "\n![pruning sweep](pruning_sweep.png)\n"
    atomic_write_text(out / "report.md", text)
    console.print(table)
    if fidelity:
        console.print(fidelity)
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
