"""Gradient caching (Gao et al., 2021): the gradient of a contrastive loss over a batch of B, computed in
k chunks with the activation memory of B/k.

1. embed every chunk without autograd, remembering the RNG state before each;
2. loss of the cached embeddings, and its gradient with respect to them (and to the logit scale and the
   loss's own parameters);
3. re-run each chunk with autograd from its remembered RNG state (same dropout, same augmentation draws)
   and back-propagate the cached embedding gradient through it.

The gradient is that of the whole batch for towers whose output for a sample does not depend on the other
samples (ViTs, transformer text towers: layer norm). A batch-norm layer in training mode normalizes with
its batch's statistics, which here are each chunk's (B/k samples, as in the GradCache paper's setting): the
gradient is then that of k chunks, each with its own statistics, not that of one batch of B. Running
statistics are updated once per chunk, by the re-run; the embedding pass leaves them as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase


def _rng_state() -> tuple:
    cuda = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _tracking_norms(model: torch.nn.Module) -> list[_NormBase]:
    # only a norm layer in training mode that tracks running statistics changes them in a forward
    return [
        m
        for m in model.modules()
        if isinstance(m, _NormBase) and m.training and m.track_running_stats and m.running_mean is not None
    ]


@contextmanager
def running_stats_unchanged(model: torch.nn.Module) -> Iterator[None]:
    """Forwards inside leave every running mean, variance and ``num_batches_tracked`` as they were, while
    norm layers in training mode still normalize with their batch's statistics.

    Restoring the buffers rather than zeroing the momentum: with ``momentum=None`` (a cumulative average)
    the update depends on ``num_batches_tracked``, which every training forward advances.
    """
    saved = [
        (buffer, buffer.detach().clone())
        for m in _tracking_norms(model)
        for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buffer is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def batch_norms_in_training(model: torch.nn.Module) -> list[str]:
    """Names of the batch-norm layers that normalize with batch statistics while ``model`` trains
    (frozen ones, and those of a locked tower, which stays in eval mode, are left out)."""
    modes = {m: m.training for m in model.modules()}
    model.train()  # what the towers do in training: a locked tower keeps itself in eval mode
    try:
        return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.training]
    finally:
        for m, training in modes.items():
            m.training = training


def batch_norm_notice(model: torch.nn.Module, chunks: int) -> str | None:
    """What gradient caching over ``chunks`` chunks gives a model with batch norm, for the start-up log;
    None when it gives the whole batch's gradient exactly."""
    if chunks <= 1:
        return None
    names = batch_norms_in_training(model)
    if not names:
        return None
    towers = sorted({n.split(".")[0] for n in names})
    return (
        f"trainer.grad_cache_chunks={chunks}: {len(names)} batch-norm layers ({', '.join(towers)}) "
        f"normalize each chunk of data.batch_size/{chunks} samples with that chunk's own statistics, so "
        f"their gradient is that of {chunks} chunks with their own statistics, not that of one batch "
        "(running statistics are updated once per chunk). Towers without batch norm get the whole "
        "batch's gradient exactly."
    )


def grad_cache_step(
    model: torch.nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    chunks: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict],
    loss_params: list[torch.nn.Parameter],
    backward: Callable[[torch.Tensor, bool], None],
) -> dict:
    """Accumulate into ``.grad`` the gradient of ``loss_fn(image_emb, text_emb, logit_scale)["loss"]``.

    ``model(images, tokens) -> (image_emb, text_emb, logit_scale)``. ``backward(surrogate, last)`` runs
    each chunk's backward; DDP should sync only when ``last`` (the logit scale and ``loss_params`` get
    their gradient in that one, so every parameter takes part in the synchronizing pass).
    Returns ``loss_fn``'s outputs, detached.
    """
    image_chunks, token_chunks = images.chunk(chunks), tokens.chunk(chunks)
    states, image_embs, text_embs = [], [], []
    # the re-run below updates batch-norm running statistics once per chunk; this pass must not as well
    with torch.no_grad(), running_stats_unchanged(model):
        for image, token in zip(image_chunks, token_chunks, strict=True):
            states.append(_rng_state())
            image_emb, text_emb, logit_scale = model(image, token)
            image_embs.append(image_emb)
            text_embs.append(text_emb)
    after = _rng_state()

    cached = [torch.cat(image_embs).requires_grad_(), torch.cat(text_embs).requires_grad_()]
    scale = logit_scale.detach().requires_grad_()
    out = loss_fn(cached[0], cached[1], scale)
    inputs = [*cached, scale, *loss_params]
    grads = torch.autograd.grad(out["loss"], inputs, allow_unused=True)
    image_grad, text_grad = (g.split([c.shape[0] for c in image_chunks]) for g in grads[:2])
    scale_grad, param_grads = grads[2], grads[3:]

    for i, (image, token) in enumerate(zip(image_chunks, token_chunks, strict=True)):
        last = i == len(image_chunks) - 1
        _set_rng_state(states[i])
        image_emb, text_emb, live_scale = model(image, token)
        surrogate = (image_emb * image_grad[i]).sum() + (text_emb * text_grad[i]).sum()
        if last:
            # zero terms keep unused parameters in the graph so DDP's reducer sees every one
            surrogate = surrogate + live_scale * (scale_grad if scale_grad is not None else 0.0)
            for p, g in zip(loss_params, param_grads, strict=True):
                surrogate = surrogate + (p * (g if g is not None else torch.zeros_like(p))).sum()
        backward(surrogate, last)
    _set_rng_state(after)
    return {k: v.detach() for k, v in out.items()}
