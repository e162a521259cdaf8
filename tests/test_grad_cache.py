"""Gradient caching gives the gradient of the whole batch, dropout included; batch-norm towers get that of
their chunks, each with its own statistics, and running statistics updated once per chunk."""

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from autoglm_train.lit.grad_cache import batch_norm_notice, grad_cache_step
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


def cached(dropout: float, made=None):
    model, objective, images, tokens, ids = made or make(dropout)
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


def make_resnet(momentum: float | None = 0.1, **lock):
    """timm's test_resnet image tower: batch norm as in the default ResNet-18, a thirtieth of its size."""
    torch.manual_seed(0)
    model = DualEncoder(
        ImageTower("test_resnet"), TextTower(50, 32, 1, 2, 8, dropout=0.0), embed_dim=16, **lock
    )
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.momentum = momentum  # None: cumulative average, driven by num_batches_tracked
    objective = Objective({"infonce": InfoNCE()})
    images = torch.randn(B, 3, 32, 32)
    tokens = torch.randint(1, 50, (B, 8))
    return model.train(), objective, images, tokens, torch.arange(B)


def chunk_by_chunk(made):
    """What the README promises for batch norm: each chunk through the model with autograd (its own batch
    statistics; running statistics updated once per chunk), embeddings concatenated, one loss, backward."""
    model, objective, images, tokens, ids = made
    parts = [model(i, t) for i, t in zip(images.chunk(CHUNKS), tokens.chunk(CHUNKS), strict=True)]
    loss = objective(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), parts[0][2], ids)
    loss["loss"].backward()
    return grads(model, objective)


def running_stats(model) -> dict[str, torch.Tensor]:
    return {
        n: b.clone()
        for n, b in model.named_buffers()
        if n.rsplit(".", 1)[-1].startswith(("running_", "num_"))
    }


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_running_statistics_are_updated_once_per_chunk(momentum):
    expected_model = make_resnet(momentum)
    chunk_by_chunk(expected_model)
    model = make_resnet(momentum)
    before = running_stats(model[0])
    cached(0.0, model)

    got, expected = running_stats(model[0]), running_stats(expected_model[0])
    assert got.keys() == expected.keys() and len(got) == 3 * 15  # its 15 batch norms
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)
        if name.endswith("num_batches_tracked"):
            assert got[name].item() == before[name].item() + CHUNKS, name


def test_batch_norm_gradient_is_that_of_the_chunks_with_their_own_statistics():
    expected = chunk_by_chunk(make_resnet())
    _, got = cached(0.0, make_resnet())
    assert got.keys() == expected.keys() and any(n.startswith("image_tower.") for n in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_batch_norm_gradient_differs_from_the_whole_batch():
    # guards the test above: per-chunk statistics are really another gradient than the batch's
    model, objective, images, tokens, ids = make_resnet()
    image, text, scale = model(images, tokens)
    objective(image, text, scale, ids)["loss"].backward()
    whole = grads(model, objective)
    _, got = cached(0.0, make_resnet())
    name = "image_tower.backbone.conv1.0.weight"
    assert not torch.allclose(got[name], whole[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("freeze_bn", [False, True], ids=["locked_eval_mode", "frozen_batch_norm"])
def test_locked_batch_norm_tower_keeps_its_statistics_and_gives_the_whole_batch_gradient(freeze_bn):
    # a locked tower stays in eval mode (running statistics used, never updated); FrozenBatchNorm2d has
    # none to update: chunking changes nothing
    made = make_resnet(lock_image=True, lock_image_freeze_bn=freeze_bn)
    model, objective, images, tokens, ids = made
    assert batch_norm_notice(model, CHUNKS) is None
    before = running_stats(model)
    image, text, scale = model(images, tokens)
    objective(image, text, scale, ids)["loss"].backward()
    whole = grads(model, objective)
    model.zero_grad(set_to_none=True)
    objective.zero_grad(set_to_none=True)

    _, got = cached(0.0, made)
    assert got.keys() == whole.keys() and not any(n.startswith("image_tower.") for n in got)
    for name in whole:
        torch.testing.assert_close(got[name], whole[name], atol=1e-5, rtol=1e-4, msg=name)
    for name, value in running_stats(model).items():
        assert torch.equal(value, before[name]), name


def test_batch_norm_notice_names_the_towers_that_train_batch_norms():
    notice = batch_norm_notice(make_resnet()[0], CHUNKS)
    assert notice is not None and "15 batch-norm layers (image_tower)" in notice and f"/{CHUNKS}" in notice
    assert batch_norm_notice(make_resnet()[0], 1) is None
    assert batch_norm_notice(make(0.0)[0], CHUNKS) is None  # ViT + transformer text: layer norm only
    # the last stage left unlocked (and unfrozen) still trains its batch norms
    partly = make_resnet(lock_image=True, lock_image_unlocked_groups=1, lock_image_freeze_bn=True)[0]
    assert "batch-norm layers (image_tower)" in batch_norm_notice(partly, CHUNKS)
    # asking does not change the model's modes
    model = make_resnet()[0].eval()
    batch_norm_notice(model, CHUNKS)
    assert not any(m.training for m in model.modules())


@pytest.mark.slow
def test_training_with_grad_cache_runs_its_own_optimizer_steps(tiny_cfg, caplog):
    from autoglm_train import train

    metrics = train.run(
        tiny_cfg(
            "trainer.grad_cache_chunks=4",
            "trainer.gradient_clip_val=1.0",
            "trainer.max_steps=6",
            "trainer.val_check_interval=6",
            "eval.zeroshot.task=null",
        )
    )
    # manual optimization: every step is ours (optimizer, clipping, schedule); Lightning counts them
    assert metrics["train/steps"] == 6
    # the default job's resnet18_narrow (ResNet-18's 20 + its first stage's downsample): the start-up log
    # says what its batch norms get
    assert "trainer.grad_cache_chunks=4: 21 batch-norm layers (image_tower)" in caplog.text
