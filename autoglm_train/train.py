"""The only place that reads the whole config: build data, tokenizer, model, module and trainer; fit;
evaluate; write metrics.json into the run directory."""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import RichProgressBar
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from autoglm_train.build import (
    build_model,
    build_objective,
    build_run_tokenizer,
    build_zeroshot,
    check_model_weights,
    split_optimizer_config,
    without_weights,
)
from autoglm_train.config_check import check_train_config
from autoglm_train.data.caption_negatives import caption_negatives
from autoglm_train.distributed.fsdp import is_checkpoint
from autoglm_train.distributed.liveness import strategy_with_timeout
from autoglm_train.eval.run_metrics import final_metrics
from autoglm_train.eval.zeroshot import zeroshot_metrics
from autoglm_train.lit.callbacks import CommStats, ModelSummary, TrainTimer
from autoglm_train.lit.checkpoint_io import VerifiedCheckpointIO
from autoglm_train.lit.divergence import DivergenceGuard
from autoglm_train.lit.feature_cache import FeatureCacheCallback
from autoglm_train.lit.grad_cache import batch_norm_notice
from autoglm_train.lit.lost_rank import LostRankWatch
from autoglm_train.lit.module import DualEncoderModule
from autoglm_train.lit.preemption import Preemption
from autoglm_train.lit.run_state import RunState
from autoglm_train.model.momentum import MomentumEncoder
from autoglm_train.model.weights import init_from_checkpoint, load_checkpoint
from autoglm_train.resume_config import check_resume_config
from autoglm_train.utils.checkpoint_files import (
    DamagedCheckpointError,
    history,
    newest_good,
    verify_checkpoint,
)
from autoglm_train.utils.files import atomic_write_text

log = logging.getLogger(__name__)
console = Console()


def build_logger(cfg: DictConfig):
    if cfg.get("logger") is None:
        return False
    return instantiate(cfg.logger)


def split_trainer_config(cfg: DictConfig) -> tuple[DictConfig, int, float | None]:
    """The Trainer's arguments, less ours: ``skip_nonfinite_steps`` (lit/divergence.py),
    ``collective_timeout`` (into the strategy, distributed/liveness.py) and ``grad_cache_chunks`` (and with
    it gradient clipping, which the module then does itself, since Lightning clips only under automatic
    optimization). Combinations are checked by config_check.py."""
    trainer_cfg = OmegaConf.create(OmegaConf.to_container(cfg.trainer, resolve=True))
    with open_dict(trainer_cfg):
        trainer_cfg.pop("skip_nonfinite_steps", None)
        timeout = trainer_cfg.pop("collective_timeout", None)
        if "strategy" in trainer_cfg:
            trainer_cfg.strategy = strategy_with_timeout(trainer_cfg.strategy, timeout)
        chunks = int(trainer_cfg.pop("grad_cache_chunks", 1) or 1)
        grad_clip = trainer_cfg.pop("gradient_clip_val", None) if chunks > 1 else None
    return trainer_cfg, chunks, grad_clip


def build_module(cfg: DictConfig, model, tokenizer_json: str | None = None) -> DualEncoderModule:
    """The LightningModule of a composed config around ``model``: the objective, the momentum encoder, the
    optimizer and its schedule, gradient caching and the evaluation settings."""
    momentum = None
    if cfg.momentum.enabled:
        momentum = MomentumEncoder(model, cfg.momentum.m, cfg.momentum.schedule, cfg.trainer.max_steps)
    _, grad_cache_chunks, grad_clip = split_trainer_config(cfg)
    optimizer_cfg, image_layer_decay, text_layer_decay = split_optimizer_config(cfg.optimizer)
    return DualEncoderModule(
        model,
        build_objective(cfg.loss, model, cfg.seed),
        optimizer=instantiate(optimizer_cfg),
        image_layer_decay=image_layer_decay,
        text_layer_decay=text_layer_decay,
        warmup_steps=cfg.scheduler.warmup_steps,
        min_lr_ratio=cfg.scheduler.min_lr_ratio,
        eval_chunk_size=cfg.eval.chunk_size,
        rerank_k=int(cfg.eval.get("rerank", {}).get("k") or 0),
        rerank_score=cfg.eval.get("rerank", {}).get("score", "itm"),
        tokenizer_json=tokenizer_json,
        momentum=momentum,
        grad_cache_chunks=grad_cache_chunks,
        grad_clip=grad_clip,
    )


def find_resume_checkpoint(output_dir: Path) -> Path | None:
    """The newest good checkpoint a requeued (or re-run) job left in its own run directory: Lightning's
    preemption checkpoint (``hpc_ckpt_N.ckpt``, written on Slurm's warning signal), the periodic
    ``checkpoints/last.ckpt`` (all there is after a hard kill) or a kept older version of it
    (``last-1.ckpt``, ...). A damaged one (truncated by a full disk, half copied) is skipped, saying why."""
    last = output_dir / "checkpoints" / "last.ckpt"
    candidates = [*output_dir.glob("hpc_ckpt_*.ckpt"), *history(last)]
    found = sorted(
        (p for p in candidates if is_checkpoint(p)),  # a file, or a sharded checkpoint's folder
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    chosen, _, skipped = newest_good(found)
    for path, why in skipped:
        log.warning("resume: skipped %s: %s", path, why)
    if skipped and chosen:
        log.warning("resume: falling back to %s, the newest good checkpoint", chosen)
    if skipped and not chosen:
        raise DamagedCheckpointError(
            f"no good checkpoint to resume from in {output_dir}: " + "; ".join(why for _, why in skipped)
        )
    return chosen


def resume_checkpoint(cfg: DictConfig, output_dir: Path) -> Path | None:
    """What this run resumes from: ``ckpt_path`` as given (verified: a damaged one is refused, naming
    any good older version beside it), else the newest good checkpoint of its own run directory."""
    if not cfg.ckpt_path:
        found = find_resume_checkpoint(output_dir)
        if found:
            console.print(f"[bold]Resuming[/bold] from {found} (found in the run directory)")
        return found
    path = Path(cfg.ckpt_path)
    try:
        verify_checkpoint(path)
    except DamagedCheckpointError as exc:
        older, _, _ = newest_good(history(path)[1:])
        hint = f"; the newest good version beside it: ckpt_path={older}" if older else ""
        raise DamagedCheckpointError(f"{exc}{hint}") from exc
    return path


def check_resume(cfg: DictConfig, ckpt_path: Path, config: dict) -> None:
    """Refuse a resume whose config changes what the checkpoint's run was (``resume_config.py``)."""
    saved = load_checkpoint(ckpt_path, mmap=True).get("config")
    allow = list(cfg.get("resume", {}).get("allow_changes") or [])
    accepted = check_resume_config(saved, config, allow)
    if accepted:
        log.info("resume: config changes accepted:\n  %s", "\n  ".join(accepted))


def run_config(cfg: DictConfig) -> dict:
    """The composed config as written (interpolations unresolved, so a key that follows another, such
    as a schedule's length following ``trainer.max_steps``, changes only where the user changed it): saved
    in every checkpoint, for a resume to compare against."""
    return OmegaConf.to_container(cfg, resolve=False)


def core_callbacks(
    skip_nonfinite_steps: int = 0, collective_timeout: float | None = None, config: dict | None = None
) -> list[L.Callback]:
    """What a correct run needs, so not the user's to drop (``callbacks=none`` keeps them): resume state
    (``RunState``, with the run's config), the divergence stop, preemption, comm figures, the end of a
    job that lost a rank."""
    return [
        RunState(config),
        DivergenceGuard(skip_nonfinite_steps),
        Preemption(),
        CommStats(),
        LostRankWatch(collective_timeout),
    ]


def check_launch(trainer: L.Trainer) -> str:
    """Name the cluster environment; refuse what would go wrong silently.

    Lightning's own DDP launcher starts the other ranks by re-running the command line, which under a
    local Hydra multirun would start the whole sweep again in each child.
    """
    environment = trainer._accelerator_connector.cluster_environment
    launches_children = (
        trainer.num_devices * trainer.num_nodes > 1 and not environment.creates_processes_externally
    )
    if launches_children and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ValueError(
            "a local multirun cannot start DDP processes (Lightning re-runs the command line for each "
            "rank, which would restart the sweep): sweep with hydra/launcher=slurm, where srun makes "
            "the ranks, or run each point of the sweep as its own command"
        )
    return type(environment).__name__


def print_results(metrics: dict[str, float], output_dir: Path) -> None:
    table = Table(title=f"Results ({output_dir})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        is_count = key.startswith(("train/steps", "train/samples", "data/")) or key in (
            "val/images",
            "val/captions",
        )
        table.add_row(key, f"{int(value)}" if is_count else f"{value:.4f}")
    console.print(table)


def not_an_advertisement(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    # its hosted logger's advertisement, and its note that our summary callback replaces its own
    return "litlogger" not in message and "Skipping setting a default `ModelSummary`" not in message


def quiet_library_noise() -> None:
    # Lightning adds its own console handler; under Hydra the root logger already prints (and files) them
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")
    # printed at every start and not about this run
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(not_an_advertisement)


def start_run(cfg: DictConfig) -> Path:
    """What every entry point does first: quiet logs, the run directory made and printed, seed, threads."""
    quiet_library_noise()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]Run directory:[/bold] {output_dir}")
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)
    return output_dir


def run(cfg: DictConfig) -> dict[str, float]:
    run_start = time.perf_counter()
    check_train_config(cfg)  # every bad value at once, before anything is made
    output_dir = start_run(cfg)

    config = run_config(cfg)
    ckpt_path = resume_checkpoint(cfg, output_dir)
    if ckpt_path:
        check_resume(cfg, ckpt_path, config)

    # resuming (a requeued job too): the checkpoint holds every weight, so released weights and weight
    # files are neither needed nor read again; otherwise missing weights fail here, before any data is made.
    # init_from: a fresh run (optimizer, schedule, step) from a trained run's weights and tokenizer
    init_path = None if ckpt_path else cfg.get("init_from")
    model_cfg = without_weights(cfg.model) if ckpt_path or init_path else cfg.model
    if not (ckpt_path or init_path):
        check_model_weights(cfg.model)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # makes or checks the shards before anything expensive is built

    tokenizer = build_run_tokenizer(
        cfg.tokenizer,
        model_cfg,
        datamodule.train_shards,
        datamodule.caption_key,
        ckpt_path or init_path,
        output_dir / "tokenizer.json",
    )
    model = build_model(model_cfg, tokenizer)
    if init_path:
        init_from_checkpoint(model, init_path)
    datamodule.attach(
        tokenizer,
        model.image_tower.data_config,
        trim_text=model.text_trims_padding,
        text_negatives=caption_negatives(
            cfg.loss.get("text_negatives"), cfg.loss.get("text_negatives_count", 1)
        ),
    )

    trainer_cfg, grad_cache_chunks, _ = split_trainer_config(cfg)
    if notice := batch_norm_notice(model, grad_cache_chunks):
        log.warning(notice)
    module = build_module(cfg, model, tokenizer.to_json())
    timer, core = (
        TrainTimer(),
        core_callbacks(
            int(cfg.trainer.get("skip_nonfinite_steps") or 0), cfg.trainer.get("collective_timeout"), config
        ),
    )
    run_state = core[0]
    callbacks = [*core]
    if getattr(model, "cache_locked_features", False):
        # before the timer: building the cache is not training time (run_s has it)
        callbacks.append(FeatureCacheCallback(cfg.paths.feature_cache_dir, progress=bool(cfg.progress_bar)))
    callbacks.append(timer)
    callbacks += [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if cfg.progress_bar:
        callbacks.append(RichProgressBar())
    if trainer_cfg.get("enable_model_summary") is not False:
        callbacks.append(ModelSummary())
    trainer: L.Trainer = instantiate(
        trainer_cfg,
        callbacks=callbacks,
        logger=build_logger(cfg),
        plugins=[VerifiedCheckpointIO(int(cfg.checkpoint.get("keep_last", 2)))],
        default_root_dir=str(output_dir),
        enable_progress_bar=bool(cfg.progress_bar),
    )
    environment = check_launch(trainer)
    log.info("cluster environment: %s (rank %d of %d)", environment, trainer.global_rank, trainer.world_size)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    # the final state, whatever the checkpoint callbacks' schedule (Lightning writes it on rank 0)
    trainer.save_checkpoint(output_dir / "checkpoints" / "last.ckpt", weights_only=False)
    metrics = final_metrics(module, trainer, datamodule, timer, run_state)
    if cfg.eval.zeroshot.task:
        metrics |= zeroshot_metrics(
            model,
            tokenizer,
            build_zeroshot(cfg.eval.zeroshot, cfg.data),
            datamodule.eval_transform,
            cfg.eval.zeroshot.batch_size,
            module.device,
        )
    # the whole run: data generation, tokenizer and evaluations included
    metrics["time/run_s"] = time.perf_counter() - run_start

    if trainer.is_global_zero:
        finish_run(metrics, output_dir)
    return metrics


def finish_run(metrics: dict[str, float], output_dir: Path) -> None:
    """What every entry point does last, on rank 0: metrics.json, the results table, the run directory."""
    atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
    print_results(metrics, output_dir)
    console.print(f"[bold]Run directory:[/bold] {output_dir}")


def entry(cfg: DictConfig) -> float:
    """What ``python -m autoglm_train`` runs: ``run(cfg)``, returning ``cfg.optimized_metric`` for sweepers.

    In a multirun a failing run is recorded (``failed.json`` in its directory, a failed row in the sweep
    summary; NaN, which Optuna marks as a failed trial) and the sweep goes on. A single run raises.
    """
    try:
        metrics = run(cfg)
    except Exception as exc:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        log.exception("run failed; the sweep goes on")
        output_dir = Path(cfg.paths.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            output_dir / "failed.json", json.dumps({"error": f"{type(exc).__name__}: {exc}"}, indent=2)
        )
        return float("nan")
    return metrics.get(cfg.optimized_metric, float("nan"))
