"""``model.compile=step``: the training step's forward (both towers, heads, temperature) and the objective
(gather, loss terms, weighted sum) as one ``torch.compile``'d function, like open_clip's
``--torchcompile-strategy step``. Its loss carries AOTAutograd's compiled backward, so Lightning's ordinary
``loss.backward()`` (automatic optimization) runs the compiled backward graph; the optimizer step stays
eager (fused AdamW is one kernel per group already).

What is compiled is ``loss_step`` below, the same calls as the eager training step, so the two give the
same losses and gradients (to rounding: inductor fuses and reorders floating-point work). The step number
is a symbolic int from the first call, and the text length dynamic where the loader trims padding, so
plain InfoNCE on one process is one graph for the whole run (fp32 or bf16 autocast, with or without
gradient checkpointing). Graph breaks and recompiles are allowed, so everything else still runs (measured
with torch 2.14):
- a temperature schedule compiles into the same graph; the triplet margin's warm-up compiles once more
  when it ends (``step >= steps`` is a branch);
- the momentum queue recompiles while it fills (its fill count is a plain int), then stays; a queue that
  takes more than dynamo's recompile limit (8) of steps to fill leaves that part eager; its finiteness
  check before enqueueing is a data-dependent branch (a graph break);
- SigLIP reads its bias to the host for ``sched/siglip_bias`` (a graph break, and a GPU sync eager too);
- the gather across ranks: torch's ``torch.distributed.nn.functional.all_gather`` refuses to be traced, so
  dynamo runs ``loss_step`` itself eagerly and compiles the model's forward and the objective's pieces
  around the gathers as frames of their own (2 ranks: same losses and gradients as eager).

The compiled function is made on the first call (the first training step), never at construction, and a
``CompiledStep`` pickles and deep-copies without it: the LightningModule stays picklable (spawned DDP
workers, ``copy.deepcopy``), and its checkpoints hold the model's own state-dict keys (the model itself is
never wrapped, so there is no ``_orig_mod.`` prefix).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn


def loss_step(
    model: nn.Module,
    objective: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    ids: torch.Tensor | None,
    step: int,
    momentum: tuple[torch.Tensor, ...] | None,
    text_neg: torch.Tensor | None = None,
    text_neg_valid: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The eager training step's forward and loss: ``(objective's dict, logit scale)``. ``text_neg``: the
    tokens of generated caption negatives (loss.text_negatives), embedded by the same text tower."""
    fusion = None
    if getattr(model, "fusion", None) is not None:  # the towers' token states too, for the itm term
        image, text, logit_scale, states = model.encode_tokens(images, tokens)
        fusion = (model.itm_logits, states)
    else:
        image, text, logit_scale = model(images, tokens)
    neg = None
    if text_neg is not None and fusion is not None:  # the fusion stage also reads the caption negatives
        neg, neg_states, neg_padding = model.encode_text_tokens(text_neg)
        valid = text_neg_valid if text_neg_valid is not None else torch.ones_like(neg_padding[:, 0])
        fusion = (*fusion, (neg_states, neg_padding, valid))
    elif text_neg is not None:
        neg = model.encode_text(text_neg)
    out = objective(
        image,
        text,
        logit_scale,
        ids,
        step=step,
        momentum=momentum,
        text_neg=neg,
        text_neg_valid=text_neg_valid,
        fusion=fusion,
    )
    # a loss without temperature (triplet) leaves the logit scale out of the graph, which DDP
    # (find_unused_parameters=False) refuses; a zero term keeps it in at no cost
    out["loss"] = out["loss"] + 0.0 * logit_scale
    return out, logit_scale


@contextlib.contextmanager
def tower_trim_off(model: nn.Module) -> Iterator[None]:
    """The text tower's own dropping of all-padding columns (on CPU tensors) switched off while the step is
    traced and run: it reads the batch's length to the host (a graph break, and a new graph per length),
    and the training loader already drops those columns on the host (``ShardDataModule.attach(trim_text)``),
    so the tower's trim has nothing left to do. The output is the same either way (padding is masked)."""
    tower = getattr(model, "text_tower", None)
    if tower is None or not getattr(tower, "trim_padding", False):
        yield
        return
    tower.trim_padding = False
    try:
        yield
    finally:
        tower.trim_padding = True


def compiles_step(model: nn.Module) -> bool:
    """Whether the model was built with ``model.compile=step``."""
    return getattr(model, "compile_mode", None) == "step"


GRAD_CACHE_REFUSED = (
    "model.compile=step compiles the forward and loss of one whole batch, which gradient caching "
    "(trainer.grad_cache_chunks > 1) replaces by its own chunked passes: use model.compile=towers with "
    "gradient caching, or trainer.grad_cache_chunks=1"
)


STEP_SOURCE = "L['step']"  # loss_step's ``step`` argument, as dynamo names it


class CompiledStep:
    """``torch.compile(loss_step)``, made on the first call; pickles and copies without it (rebuilt on the
    next call). ``options`` go to ``torch.compile`` (``backend``, ``mode``, ...)."""

    def __init__(self, **options) -> None:
        self.options = options
        self.fn: Callable | None = None

    def __call__(
        self, model, objective, images, tokens, ids, step, momentum, text_neg=None, text_neg_valid=None
    ):
        if self.fn is None:
            self.fn = torch.compile(loss_step, **self.options)
        if getattr(model, "text_trims_padding", False):
            # the loader drops all-padding columns, so every batch may have another length: one graph for
            # any length, rather than a first graph for one length and a recompile at the next
            torch._dynamo.maybe_mark_dynamic(tokens, 1)
            if text_neg is not None:
                torch._dynamo.maybe_mark_dynamic(text_neg, 1)
        # the step number is an int dynamo would first specialize on (a guard ``step == 0``, so a second
        # compilation at step 1): a symbolic int from the start
        with tower_trim_off(model), torch.compiler.config.patch(dynamic_sources=STEP_SOURCE):
            return self.fn(model, objective, images, tokens, ids, step, momentum, text_neg, text_neg_valid)

    def __getstate__(self) -> dict:
        return {"options": self.options, "fn": None}

    def __setstate__(self, state: dict) -> None:
        self.options, self.fn = state["options"], None
