"""LightningModule: model -> objective -> log; retrieval evaluation on the held-out shards."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR

from autoglm_train.distributed.fsdp import is_sharded
from autoglm_train.distributed.gather import gather_variable, gather_with_grad
from autoglm_train.eval.rerank import group_pair_scores, pair_scores, rerank_metrics
from autoglm_train.eval.retrieval import group_recall, retrieval_metrics, retrieval_rows
from autoglm_train.lit.compiled_step import GRAD_CACHE_REFUSED, CompiledStep, compiles_step, loss_step
from autoglm_train.lit.grad_cache import grad_cache_step
from autoglm_train.losses.itm import pad_tokens


def warmup_cosine(step: int, warmup_steps: int, total_steps: float, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from 0, then cosine to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not math.isfinite(total_steps) or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class DualEncoderModule(L.LightningModule):
    """The model trained through the objective (one backward, or gradient caching's chunked backward),
    the momentum encoder kept up with it, and retrieval on the held-out shards.

    Beside it, as callbacks (train.py adds them): what a checkpoint holds to resume (lit/run_state.py),
    non-finite steps (lit/divergence.py), Slurm preemption (lit/preemption.py), communication figures
    (lit/callbacks.py).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        objective: torch.nn.Module,
        optimizer: Callable,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        eval_chunk_size: int = 1024,
        tokenizer_json: str | None = None,
        momentum: torch.nn.Module | None = None,
        grad_cache_chunks: int = 1,
        grad_clip: float | None = None,
        image_layer_decay: float = 1.0,
        text_layer_decay: float = 1.0,
        rerank_k: int = 0,
        rerank_score: str = "itm",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "objective", "optimizer", "tokenizer_json", "momentum"])
        self.model = model
        self.momentum = momentum  # a MomentumEncoder (EMA of `model`), or None
        self.objective = objective
        self.objective.gather = gather_with_grad  # negatives from every rank
        self.optimizer_factory = optimizer
        self.tokenizer_json = tokenizer_json
        self.step_losses: dict[str, torch.Tensor] = {}  # this step's loss terms, for the divergence check
        self.last_val: tuple[int, dict[str, float]] | None = None
        self._val: dict[str, list[torch.Tensor]] = {}
        # gradient caching drives its own backward passes, so the optimizer step is ours too
        self.automatic_optimization = grad_cache_chunks <= 1

    # --- training -------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        keys = self.momentum.encode(batch["image"], batch["text"]) if self.momentum is not None else None
        if keys is not None and "text_neg" in batch:  # the momentum model's view of the caption negatives
            with torch.no_grad():
                keys = (*keys, self.momentum.module.encode_text(batch["text_neg"]))
        if self.automatic_optimization:
            # forward + objective (+ the zero logit-scale term DDP needs): lit/compiled_step.py's loss_step,
            # eager, or as one torch.compile'd function with model.compile=step (made at the first step,
            # left out of pickles); Lightning's backward then runs AOTAutograd's compiled backward
            run = loss_step
            if compiles_step(self.model):
                if getattr(self, "compiled_step", None) is None:
                    self.compiled_step = CompiledStep()
                run = self.compiled_step
            inputs = (
                batch["image"],
                batch["text"],
                batch.get("id"),
                self.global_step,
                keys,
                batch.get("text_neg"),
                batch.get("text_neg_valid"),
            )
            out, logit_scale = run(self.model, self.objective, *inputs)
            self.step_losses = {k: v.detach() for k, v in out.items() if k.startswith("loss")}
        else:
            if compiles_step(self.model):  # config_check refuses this first; a module built by hand too
                raise ValueError(GRAD_CACHE_REFUSED)
            out, logit_scale = self._grad_cache_step(batch, keys)
        n = batch["image"].shape[0]
        # a progress-bar value is read to the host every step (a GPU sync): only when a bar shows it
        bar = self._trainer is not None and self.trainer.progress_bar_callback is not None
        self.log("train/loss", out["loss"], prog_bar=bar, batch_size=n)
        for key, value in out.items():  # each term, and every scheduled value, on its own
            if key != "loss":
                self.log(f"train/{key}", value, batch_size=n)
        self.log("train/logit_scale", logit_scale.detach(), batch_size=n)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=n)
        return out["loss"]

    def _grad_cache_step(self, batch: dict, keys) -> tuple[dict, torch.Tensor]:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        step = self.global_step

        def loss_fn(image, text, logit_scale):
            return self.objective(image, text, logit_scale, batch.get("id"), step=step, momentum=keys)

        def backward(surrogate: torch.Tensor, last: bool) -> None:
            # DDP syncs gradients only in the last chunk's backward; single-device strategies never do
            block = getattr(self.trainer.strategy, "block_backward_sync", None)
            with contextlib.nullcontext() if last or block is None else block():
                self.manual_backward(surrogate)

        out = grad_cache_step(
            self.model,
            batch["image"],
            batch["text"],
            self.hparams.grad_cache_chunks,
            loss_fn,
            [p for p in self.objective.parameters() if p.requires_grad],
            backward,
        )
        self.step_losses = {k: v for k, v in out.items() if k.startswith("loss")}
        if self.hparams.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        self._after_optimizer_step()
        return out, self.model.logit_scale().detach()

    def _after_optimizer_step(self) -> None:
        # the learned temperature back under its cap (CLIP's clamp, after the step), then the EMA follows
        self.model.clamp_logit_scale_()
        self._update_momentum()

    def _update_momentum(self) -> None:
        if self.momentum is not None:
            self.momentum.update(self.model, step=self.global_step)
            self.log("train/sched/momentum", self.momentum.get_decay(self.global_step))

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # once per optimizer step, not per micro-batch: Lightning calls this only when it steps
        self._after_optimizer_step()

    def configure_model(self) -> None:
        # a sharding strategy (distributed/fsdp.py) shards here: the process group and mesh exist by now.
        # Lightning calls this hook at every fit/validate, so a sharded model is left as it is.
        shard = getattr(self.trainer.strategy, "shard", None) if self._trainer is not None else None
        if shard is not None and not is_sharded(self.model):
            shard(self)

    def configure_optimizers(self):
        hp = self.hparams
        options = getattr(self.optimizer_factory, "keywords", {})
        groups = self.model.param_groups(
            options.get("weight_decay", 0.0), hp.image_layer_decay, hp.text_layer_decay
        )
        for group in groups:  # layer-wise decay: a group's rate is the base rate times its scale
            if group["lr_scale"] != 1.0:
                group["lr"] = options.get("lr", 1e-3) * group["lr_scale"]
        loss_params = [p for p in self.objective.parameters() if p.requires_grad]  # e.g. SigLIP's bias
        if loss_params:
            groups.append({"params": loss_params, "weight_decay": 0.0, "lr_scale": 1.0})
        optimizer = self.optimizer_factory([g for g in groups if g["params"]])
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else float("inf")
        schedule = LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # --- evaluation -----------------------------------------------------------------------------------
    def _hard_groups(self) -> tuple[str, ...]:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        return tuple(getattr(datamodule, "hard_groups", ()) or ())

    def _group_only(self) -> tuple[str, ...]:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        return tuple(getattr(datamodule, "group_only", ()) or ())

    def _reranks(self) -> bool:
        """Whether validation re-ranks with the fusion stage (``eval.rerank.k`` > 0 and a model that has
        one)."""
        return self.hparams.rerank_k > 0 and getattr(self.model, "fusion", None) is not None

    def on_validation_epoch_start(self) -> None:
        # the same keys on every rank (each gathers each), whether or not its share has batches
        self._val = {"image": [], "id": [], "text": [], "text_id": []}
        if self._hard_groups():
            self._val |= {"group": [], "group_kind": []}
        if self._reranks():
            self._val |= {"image_tokens": [], "text_states": [], "text_padding": []}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self._reranks():  # the token states too, padded to one length (batches trim to their own)
            image, image_tokens = self.model.encode_image_tokens(batch["image"])
            text, states, padding = self.model.encode_text_tokens(batch["text"])
            states, padding = pad_tokens(states, padding, self.model.text_tower.context_length)
            self._val["image_tokens"].append(image_tokens.float())
            self._val["text_states"].append(states.float())
            self._val["text_padding"].append(padding.to(torch.uint8))  # gathers as bytes on every backend
        else:
            image, text = self.model.encode_image(batch["image"]), self.model.encode_text(batch["text"])
        self._val["image"].append(image.float())
        self._val["text"].append(text.float())
        for key in ("id", "text_id", "group", "group_kind"):
            if key in self._val:
                self._val[key].append(batch[key])

    def on_validation_epoch_end(self) -> None:
        # each rank embedded its share of the held-out shards; every rank scores the gathered whole
        parts = {
            k: gather_variable(torch.cat(v) if v else torch.empty(0, device=self.device))
            for k, v in self._val.items()
        }
        self._val = {}
        if parts["image"].shape[0] == 0:
            raise RuntimeError("validation produced no samples: check data.val_shards")
        images, texts = retrieval_rows(parts, self._hard_groups(), self._group_only())
        metrics = retrieval_metrics(
            parts["image"][images],
            parts["id"][images],
            parts["text"][texts],
            parts["text_id"][texts],
            chunk_size=self.hparams.eval_chunk_size,
        )
        if "group" in parts:
            metrics |= group_recall(
                parts["image"],
                parts["id"],
                parts["text"],
                parts["text_id"],
                parts["group"],
                parts["group_kind"],
                self._hard_groups(),
            )
        if self._reranks():
            metrics |= self._rerank_metrics(parts, images, texts)
        metrics = {f"val/{k}": v for k, v in metrics.items()}
        metrics["val/images"] = float(images.sum())  # those retrieval scored
        metrics["val/captions"] = float(texts.sum())
        self.log_dict(metrics, prog_bar=False)
        self.last_val = (self.global_step, metrics)

    def _rerank_metrics(self, parts: dict, images: torch.Tensor, texts: torch.Tensor) -> dict[str, float]:
        """``rerank_*``: retrieval with each query's top ``eval.rerank.k`` re-ranked by the fusion stage, and
        with hard groups ``rerank_hard_r1_<kind>`` (every pair within a group scored by it)."""
        k, score = self.hparams.rerank_k, self.hparams.rerank_score
        scale = float(self.model.logit_scale())
        tokens = (parts["image_tokens"], parts["text_states"], parts["text_padding"].bool())
        was_training = self.model.training
        self.model.eval()
        try:
            out = rerank_metrics(
                parts["image"][images],
                parts["id"][images],
                parts["text"][texts],
                parts["text_id"][texts],
                self.model.itm_logits,
                tokens[0][images],
                tokens[1][texts],
                tokens[2][texts],
                k,
                score,
                scale,
                chunk_size=self.hparams.eval_chunk_size,
            )
            if "group" in parts:

                def score_pairs(image_rows, text_rows):
                    fused = pair_scores(self.model.itm_logits, *tokens, image_rows, text_rows)
                    if score == "itm+itc":
                        fused = fused + scale * (parts["image"][image_rows] * parts["text"][text_rows]).sum(
                            -1
                        )
                    return fused

                sims = group_pair_scores(
                    parts["id"], parts["text_id"], parts["group"], parts["group_kind"], score_pairs
                )
                hard = group_recall(
                    parts["image"],
                    parts["id"],
                    parts["text"],
                    parts["text_id"],
                    parts["group"],
                    parts["group_kind"],
                    self._hard_groups(),
                    sims=sims,
                )
                out |= {f"rerank_{name}": value for name, value in hard.items()}
        finally:
            self.model.train(was_training)
        return out
