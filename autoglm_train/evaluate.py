"""``python -m autoglm_train.evaluate``: score a checkpoint of ours, or a model config with released weights,
on held-out shards (retrieval R@1/5/10 both ways) and a zero-shot task, without training. Writes
``metrics.json`` into its run directory, with the keys a training run's final evaluation writes.

The retrieval pass is the training module's own validation (same gathering, same metric code), so a
checkpoint scores here exactly what its run's final evaluation reported.

With ``benchmark.dataset`` set, a clip_benchmark dataset (data/clip_benchmark.py) is scored instead: its
zero-shot classification or retrieval figures under clip_benchmark's names (eval/benchmark.py), prefixed
``benchmark/``, on one device, in fp32 or under the autocast of ``trainer.precision`` (``bf16-mixed``,
``16-mixed``: what clip_benchmark's CLI runs without ``--no_amp``).
"""

from __future__ import annotations

import copy
import logging
import time

import hydra
import lightning as L
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


def load_model(cfg: DictConfig):
    """``(model, tokenizer, data config)``: from ``ckpt`` (and its run's data unless ``data=`` is given),
    else from ``cfg.model`` with its released weights."""
    from autoglm_train.build import build_model, build_tokenizer, check_model_weights, model_family

    if cfg.ckpt:
        from autoglm_train.compress.load import load_trained

        trained = load_trained(cfg.ckpt)
        return trained.model, trained.tokenizer, cfg.get("data") or trained.cfg.data
    if not cfg.get("data") and not cfg.benchmark.dataset:
        raise ValueError(
            "evaluate: without ckpt=PATH, say which shards to score: data=wds data.val_shards=..."
        )
    check_model_weights(cfg.model)
    if model_family(cfg.model) == "ours":
        raise ValueError(
            "evaluate: our own text tower has no released weights; give ckpt=PATH of a trained run, or a "
            "pretrained family (model=open_clip, model/text_tower=hf)"
        )
    tokenizer = build_tokenizer(cfg.tokenizer, cfg.model, None, "captions", None)
    return build_model(cfg.model, tokenizer).eval(), tokenizer, cfg.get("data")


def run(cfg: DictConfig) -> dict[str, float]:
    from autoglm_train.config_check import check_evaluate_config
    from autoglm_train.train import finish_run, start_run

    check_evaluate_config(cfg)  # every bad value at once, before a checkpoint or weights are read
    start = time.perf_counter()
    output_dir = start_run(cfg)

    model, tokenizer, data_cfg = load_model(cfg)
    tokenizer.save(output_dir / "tokenizer.json")
    if cfg.benchmark.dataset:
        metrics, is_global_zero = score_benchmark(cfg, model, tokenizer, data_cfg), True
    else:
        metrics, is_global_zero = score_held_out(cfg, model, tokenizer, data_cfg, output_dir)
    metrics["time/run_s"] = time.perf_counter() - start
    if is_global_zero:
        finish_run(metrics, output_dir)
    return metrics


def score_benchmark(cfg: DictConfig, model, tokenizer, data_cfg: DictConfig | None) -> dict[str, float]:
    """``benchmark/*``: the clip_benchmark dataset of ``cfg.benchmark``, preprocessed as the model's
    held-out images are (``eval_transform``)."""
    from lightning.fabric import Fabric

    from autoglm_train.data.clip_benchmark import RETRIEVAL, open_benchmark
    from autoglm_train.eval.benchmark import classification_figures, retrieval_figures

    bench = cfg.benchmark
    dataset = open_benchmark(bench.dataset, bench.root, bench.split)
    # Lightning picks the device and the autocast of trainer.precision, as the trainer would
    fabric = Fabric(accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision)
    model = model.to(fabric.device).eval()

    def under_autocast(encode):
        def encode_in_context(x):
            with fabric.autocast():
                return encode(x)

        return encode_in_context

    encoders = under_autocast(model.encode_image), under_autocast(model.encode_text), tokenizer
    batches = dataset.batches(eval_transform(model, data_cfg), bench.batch_size, bench.num_workers)
    if dataset.task == RETRIEVAL:
        figures = retrieval_figures(
            *encoders, batches, bench.recall_k, fabric.device, chunk_size=cfg.eval.chunk_size
        )
    else:
        figures = classification_figures(
            *encoders, batches, dataset.classnames, dataset.templates, fabric.device
        )
    log.info("%s (%s, %s): %s", dataset.name, bench.split, dataset.task, figures)
    return {f"benchmark/{name}": value for name, value in figures.items()}


def eval_transform(model, data_cfg: DictConfig | None):
    """The preprocessing the model's held-out images get: its image tower's, with a run's ``data.image_size``
    and ``data.crop_pct`` where set (the datamodule's own rule, so the two cannot differ)."""
    from autoglm_train.lit.datamodule import ShardDataModule

    data_cfg = data_cfg or {}
    images = ShardDataModule(
        None, None, image_size=data_cfg.get("image_size"), crop_pct=data_cfg.get("crop_pct")
    )
    images.attach(None, model.image_tower.data_config)
    return images.eval_transform


def score_held_out(cfg: DictConfig, model, tokenizer, data_cfg: DictConfig, output_dir) -> tuple[dict, bool]:
    """Retrieval on held-out shards (the training module's validation) and ``eval.zeroshot``; the metrics
    and whether this process is rank 0."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import RichProgressBar

    from autoglm_train.build import build_zeroshot
    from autoglm_train.eval.zeroshot import zeroshot_metrics
    from autoglm_train.lit.module import DualEncoderModule
    from autoglm_train.losses.infonce import InfoNCE
    from autoglm_train.losses.objective import Objective

    data_cfg = copy.deepcopy(data_cfg)
    with open_dict(data_cfg):  # only held-out shards are read: a shard set needs no training part here
        if not data_cfg.get("prepare"):
            data_cfg.train_shards = data_cfg.val_shards
    datamodule = instantiate(data_cfg)
    datamodule.prepare_data()
    datamodule.attach(tokenizer, model.image_tower.data_config, trim_text=model.text_trims_padding)
    # nothing is trained: the module is here for its validation pass, which needs an objective to hold
    rerank = cfg.eval.get("rerank") or {}
    if rerank.get("k") and getattr(model, "fusion", None) is None:
        raise ValueError(
            f"eval.rerank.k={rerank.get('k')}: re-ranking needs a model with a fusion stage "
            "(trained with model.fusion.layers > 0)"
        )
    module = DualEncoderModule(
        model,
        Objective({"infonce": InfoNCE()}),
        optimizer=None,
        eval_chunk_size=cfg.eval.chunk_size,
        rerank_k=int(rerank.get("k") or 0),
        rerank_score=rerank.get("score", "itm"),
    )
    trainer = L.Trainer(
        **cfg.trainer,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=str(output_dir),
        enable_progress_bar=bool(cfg.progress_bar),
        callbacks=[RichProgressBar()] if cfg.progress_bar else [],
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = dict(module.last_val[1])
    if cfg.eval.zeroshot.task:
        metrics |= zeroshot_metrics(
            model,
            tokenizer,
            build_zeroshot(cfg.eval.zeroshot, data_cfg),
            datamodule.eval_transform,
            cfg.eval.zeroshot.batch_size,
            module.device,
        )
    return metrics, trainer.is_global_zero


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
