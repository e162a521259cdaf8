"""The compression job: load a trained dual encoder, prune it (iteratively, each step followed by a
distilled fine-tune), export the original and the pruned model to ONNX, quantize the graphs to int8 with
ONNX Runtime, and report every variant, PyTorch and ONNX Runtime, side by side; with ``token_merge.r``, a
family of rows for token merging in a ViT image tower (per r: image speed and recall against r = 0)."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, open_dict
from rich.console import Console

from autoglm_train.compress import prune as pruning
from autoglm_train.compress.export import export_image_variant, export_model, graphs_size
from autoglm_train.compress.load import load_trained
from autoglm_train.compress.lowrank import factorize_heads
from autoglm_train.compress.quantize import quantize_export, read_quantization
from autoglm_train.compress.recover import evaluate, finetune, frozen_copy
from autoglm_train.compress.report import (
    count_flops,
    estimate_flops,
    fidelity_tables,
    held_out_fidelity,
    markdown_table,
    measure_latency,
    sweep_plot,
    token_merge_table,
)
from autoglm_train.compress.serving import OrtDualEncoder
from autoglm_train.compress.token_merge import check_token_merging, image_backbone, token_merged, tokens_left
from autoglm_train.config_check import ConfigError, check_compress_config, show
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
    for stem, why in report["kept"].items():
        log.info("prune: the stem %s keeps its width (%s)", stem, why)
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
    merge_rs = merge_values(cfg.token_merge.r)
    if merge_rs:
        check_merge_tower(trained, cfg.token_merge.r)
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

    token_merge = []
    if merge_rs:
        original_export = next(Path(r["export_dir"]) for r in rows if r["variant"] == "ORT fp32")
        token_merge = token_merge_family(
            original, merge_rs, out, trained.tokenizer, preprocess, example, val_batches,
            cfg.report.repeats, original_export,
        )  # fmt: skip
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
        "token_merge": token_merge,
    }
    table = markdown_table(rows, batch=n)
    fidelity = fidelity_tables(rows)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    text = f"# Compression report\n\nCheckpoint: `{cfg.ckpt}`\n\n{table}\n"
    if fidelity:
        text += f"\n## INT8 fidelity\n\n{fidelity}\n"
    if token_merge:
        merge_table = token_merge_table(token_merge, batch=n)
        text += (
            "\n## Token merging in the image tower\n\nr tokens merged away per block; the image encoder "
            "alone, timed side by side; speed-up and Δ r1 against r = 0 on the same runtime.\n\n"
            f"{merge_table}\n"
        )
        console.print(merge_table)
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


def merge_values(value) -> list[int]:
    """``token_merge.r`` (an integer, or a list of them) as the r values to report; 0 is the original."""
    values = list(value) if isinstance(value, list | ListConfig) else [value]
    return sorted({int(v) for v in values if int(v) > 0})


def check_merge_tower(trained, value) -> None:
    """A ``ConfigError`` where token merging is asked of an image tower that cannot merge tokens."""
    reason = check_token_merging(trained.model)
    if reason:
        name = trained.cfg.model.get("image_tower", {}).get("name")
        tower = f" (model.image_tower.name={name})" if name else ""
        problem = f"token_merge.r={show(value)}: token merging {reason}{tower}; set token_merge.r=0"
        raise ConfigError([problem], "compression")


@torch.no_grad()
def token_merge_family(
    original,
    rs: list[int],
    out: Path,
    tokenizer,
    preprocess: dict,
    example: dict,
    val_batches: list[dict],
    repeats: int,
    original_export: Path | None = None,
) -> list[dict]:
    """r = 0 (``original``) and each r of ``rs`` merged per block in the image tower: PyTorch and ONNX
    Runtime fp32 (exported per r; ``original_export``, when given, is r = 0's), evaluated, the image encoder
    timed alone (interleaved, at batch 1 and at the example's), speed-up and Δ r1 against r = 0 on the same
    runtime; ORT rows also record their largest difference from PyTorch's embeddings (and least cosine)."""
    images = example["images"]
    backbone = image_backbone(original)
    models, rows = {}, []
    for r in [0, *rs]:
        model = original if r == 0 else token_merged(original, r)
        if r == 0:
            export_dir = original_export or export_model(
                model, tokenizer, out / "exports" / "token_merge_r0", preprocess, images
            )
            base_export = export_dir
        else:  # the text graph is r = 0's
            export_dir = out / "exports" / f"token_merge_r{r}"
            export_image_variant(model, base_export, export_dir, images)
        served = OrtDualEncoder(export_dir, threads=torch.get_num_threads())
        flops = estimate_flops(model, (images,), forward=model.encode_image)
        common = {"r": r, "tokens": tokens_left(backbone, r), "image_flops": flops}
        embeddings = model.encode_image(images)
        for runtime, variant in (("PyTorch fp32", model), ("ONNX Runtime fp32", served)):
            row = {"variant": f"token merge r={r} ({runtime})", "runtime": runtime, **common}
            if variant is served:
                row["export_dir"] = str(export_dir)
                onnx = served.encode_image(images)
                row["max_abs_diff_vs_pytorch"] = float((onnx - embeddings).abs().max())
                # a near-tie in the matching can go the other way under another kernel's rounding
                row["min_cos_vs_pytorch"] = float(F.cosine_similarity(onnx, embeddings).min())
            row.update(evaluate(variant, val_batches))
            console.print(f"{row['variant']}: val/r1_mean {row['val/r1_mean']:.4f}")
            models[row["variant"]] = variant
            rows.append(row)
    n = len(images)
    for batch_size in sorted({1, n}):
        latency = measure_latency(models, images[:batch_size], None, repeats)
        for row in rows:
            row[f"latency_s_b{batch_size}"] = latency[row["variant"]]
            row[f"throughput_b{batch_size}"] = batch_size / latency[row["variant"]]
    base = {row["runtime"]: row for row in rows if row["r"] == 0}
    for row in rows:
        row["latency_s"] = row[f"latency_s_b{n}"]
        row["speedup"] = base[row["runtime"]]["latency_s"] / row["latency_s"]
        row["delta_r1_mean"] = row["val/r1_mean"] - base[row["runtime"]]["val/r1_mean"]
    return rows
