"""Gradient caching (Gao et al., 2021): the gradient of a contrastive loss over a batch of B, computed in
k chunks with the activation memory of B/k.

1. embed every chunk without autograd, remembering the RNG state before each;
2. loss of the cached embeddings, and its gradient with respect to them (and to the logit scale and the
   loss's own parameters);
3. re-run each chunk with autograd from its remembered RNG state (same dropout, same augmentation draws)
   and back-propagate the cached embedding gradient through it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


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
    with torch.no_grad():
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
