"""Gradient caching gives the gradient of the whole batch, dropout included."""

import pytest
import torch

from autoglm_train.lit.grad_cache import grad_cache_step
from autoglm_train.losses.infonce import InfoNCE
from autoglm_train.losses.objective import Objective
from autoglm_train.losses.siglip import SigLIP
from autoglm_train.model.dual_encoder import DualEncoder
from autoglm_train.model.towers import ImageTower, TextTower

B, CHUNKS = 16, 4


def make(dropout: float):
    torch.manual_seed(0)
    image_tower = ImageTower(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, drop_rate=dropout, proj_drop_rate=dropout
    )
    text_tower = TextTower(50, 32, 1, 2, 8, dropout=dropout)
    model = DualEncoder(image_tower, text_tower, embed_dim=16).train()
    objective = Objective({"infonce": InfoNCE(), "siglip": SigLIP()})
    images = torch.randn(B, 3, 32, 32)
    tokens = torch.randint(1, 50, (B, 8))
    ids = torch.arange(B)
    return model, objective, images, tokens, ids


def grads(model, objective):
    named = list(model.named_parameters()) + list(objective.named_parameters())
    return {n: p.grad.clone() for n, p in named if p.grad is not None}


def cached(dropout: float):
    model, objective, images, tokens, ids = make(dropout)
    torch.manual_seed(123)
    out = grad_cache_step(
        model,
        images,
        tokens,
        CHUNKS,
        lambda i, t, s: objective(i, t, s, ids),
        [p for p in objective.parameters() if p.requires_grad],
        lambda surrogate, last: surrogate.backward(),
    )
    return out["loss"], grads(model, objective)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_chunks_give_the_gradient_of_the_same_forward_in_one_graph(dropout):
    # reference: the same chunks (so the same dropout draws), all kept in one autograd graph
    model, objective, images, tokens, ids = make(dropout)
    torch.manual_seed(123)
    parts = [model(i, t) for i, t in zip(images.chunk(CHUNKS), tokens.chunk(CHUNKS), strict=True)]
    loss = objective(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), parts[0][2], ids)
    loss["loss"].backward()
    expected = grads(model, objective)

    value, got = cached(dropout)
    assert value.item() == pytest.approx(loss["loss"].item(), abs=1e-6)
    assert got.keys() == expected.keys() and "log_logit_scale" in got and "terms.siglip.logit_bias" in got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_without_dropout_chunks_equal_one_full_batch_forward():
    model, objective, images, tokens, ids = make(0.0)
    image, text, scale = model(images, tokens)
    objective(image, text, scale, ids)["loss"].backward()
    expected = grads(model, objective)
    _, got = cached(0.0)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_dropout_really_differs_between_draws():
    # guards the test above: with dropout on, a forward from another RNG state gives other embeddings
    model, _, images, tokens, _ = make(0.2)
    torch.manual_seed(1)
    a = model(images, tokens)[0]
    torch.manual_seed(2)
    b = model(images, tokens)[0]
    assert not torch.allclose(a, b)


@pytest.mark.slow
def test_training_with_grad_cache_runs_its_own_optimizer_steps(tiny_cfg):
    from autoglm_train import train

    metrics = train.run(
        tiny_cfg("trainer.grad_cache_chunks=4", "trainer.gradient_clip_val=1.0", "trainer.max_steps=30")
    )
    # manual optimization: every step is ours (optimizer, clipping, schedule); Lightning counts them
    assert metrics["train/steps"] == 30
