"""``python -m autoglm_train.evaluate``: score a checkpoint of ours, or a model config with released weights,
on held-out shards (retrieval R@1/5/10 both ways) and a zero-shot task, without training. Writes
``metrics.json`` into its run directory, with the keys a training run's final evaluation writes.

The retrieval pass is the training module's own validation (same gathering, same metric code), so a
checkpoint scores here exactly what its run's final evaluation reported.
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
    if not cfg.get("data"):
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
    return build_model(cfg.model, tokenizer).eval(), tokenizer, cfg.data


def run(cfg: DictConfig) -> dict[str, float]:
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import RichProgressBar

    from autoglm_train.build import build_zeroshot
    from autoglm_train.config_check import check_evaluate_config
    from autoglm_train.eval.zeroshot import zeroshot_metrics
    from autoglm_train.lit.module import DualEncoderModule
    from autoglm_train.losses.infonce import InfoNCE
    from autoglm_train.losses.objective import Objective
    from autoglm_train.train import finish_run, start_run

    check_evaluate_config(cfg)  # every bad value at once, before a checkpoint or weights are read
    start = time.perf_counter()
    output_dir = start_run(cfg)

    model, tokenizer, data_cfg = load_model(cfg)
    tokenizer.save(output_dir / "tokenizer.json")
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
    metrics["time/run_s"] = time.perf_counter() - start
    if trainer.is_global_zero:
        finish_run(metrics, output_dir)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
