"""A non-finite loss or gradient stops the run on every rank at the same step, before the optimizer applies
it, so no checkpoint of diverged weights is ever written and the last one stays a good resume point.
``trainer.skip_nonfinite_steps=K`` first skips up to K such steps (weights, buffers and optimizer state
left as they were; each one logged)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist

from autoglm_train.distributed.fsdp import local_tensor
from autoglm_train.distributed.gather import any_rank, gather_objects

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """The run diverged: a loss term or the gradient norm is NaN or infinite."""


def first_nonfinite_term(losses: dict[str, torch.Tensor]) -> str | None:
    # the terms before their sum: the term is what names the cause
    for name, value in sorted(losses.items(), key=lambda item: item[0] == "loss"):
        if not torch.isfinite(value).all():
            return f"{name}={value.float().mean().item()}"
    return None


def grad_norm(parameters: list[torch.nn.Parameter], device: torch.device) -> torch.Tensor:
    """The global gradient norm. Sharded gradients (FSDP's DTensors): each rank's shards, then one
    all-reduce of the squares, so every rank gets the whole model's norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    if not any(hasattr(g, "to_local") for g in grads):
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    squares = torch.stack(torch._foreach_norm([local_tensor(g) for g in grads])).pow(2).sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(squares)
    return squares.sqrt()


def first_nonfinite_grad(named: list[tuple[str, torch.nn.Parameter]]) -> str:
    for name, p in named:
        if p.grad is not None and not torch.isfinite(local_tensor(p.grad)).all():
            return name
    return "?"


class DivergenceGuard(L.Callback):
    def __init__(self, skip_nonfinite_steps: int = 0):
        if skip_nonfinite_steps < 0:
            raise ValueError(f"trainer.skip_nonfinite_steps must be >= 0, got {skip_nonfinite_steps}")
        self.allowed = skip_nonfinite_steps
        self.skipped = 0
        self._buffers: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.allowed:
            # a skipped step must not leave its forward's traces either (batch-norm running statistics)
            self._buffers = {name: b.detach().clone() for name, b in pl_module.named_buffers()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        losses = getattr(pl_module, "step_losses", {})
        named = [(n, p) for n, p in pl_module.named_parameters() if p.grad is not None]
        norm = grad_norm([p for _, p in named], pl_module.device)
        # one host synchronization per step for every check: finiteness of each term and of the norm
        checks = [torch.isfinite(v).all().to(norm.device) for v in losses.values()]
        *terms_finite, norm_finite = torch.stack([*checks, torch.isfinite(norm)]).tolist()
        term = None if all(terms_finite) else first_nonfinite_term(losses)
        # a loss scaler (16-mixed) overflows on purpose now and then, and skips those steps itself
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        bad_grad = not scaled and not norm_finite
        if norm_finite:
            pl_module.log("train/grad_norm", norm)
        loss_bad, grad_bad = any_rank([term is not None, bad_grad], pl_module.device)
        if not (loss_bad or grad_bad):
            pl_module.log("train/nonfinite_skipped", float(self.skipped))
            return
        found = None
        if term:
            found = f"loss {term}"
        elif bad_grad:
            found = f"gradient norm {norm.item()} (first in {first_nonfinite_grad(named)})"
        # every rank is here (the flags were agreed), so gathering what each saw is safe
        where = "; ".join(f"rank {r}: {x}" for r, x in enumerate(gather_objects(found)) if x)
        step = trainer.global_step
        if self.skipped < self.allowed:
            self.skipped += 1
            self._skip(pl_module, optimizer)
            log.warning(
                "non-finite step %d skipped (%d of trainer.skip_nonfinite_steps=%d): %s",
                step,
                self.skipped,
                self.allowed,
                where,
            )
            pl_module.log("train/nonfinite_skipped", float(self.skipped))
            return
        raise NonFiniteError(
            f"training diverged at step {step}: non-finite {where}. The run stops before the optimizer "
            f"applies it; {last_checkpoint_note(trainer)}"
            + (f" ({self.skipped} such steps were skipped before)" if self.allowed else "")
            + ". Lower the learning rate or clip gradients (trainer.gradient_clip_val), check the data, "
            "or allow trainer.skip_nonfinite_steps=K."
        )

    def _skip(self, pl_module, optimizer) -> None:
        # a parameter without a gradient is left alone by the optimizer: no update, no moment change
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        for name, buffer in pl_module.named_buffers():
            if name in self._buffers:
                buffer.copy_(self._buffers[name])

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = state_dict.get("skipped", 0)


def last_checkpoint_note(trainer) -> str:
    saved = {
        path
        for callback in trainer.checkpoint_callbacks
        for path in (getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", ""))
        if path and Path(path).is_file()
    }
    if not saved:
        return "no checkpoint had been written yet"
    return f"the checkpoints written before it are kept: {', '.join(sorted(saved))}"
