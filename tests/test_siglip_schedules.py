import math

import pytest
import torch
from conftest import assert_rank_shares_equal_whole, unit_embeddings

from autoglm_train.losses.infonce import InfoNCE
from autoglm_train.losses.objective import Objective
from autoglm_train.losses.schedules import Cosine, Linear
from autoglm_train.losses.siglip import SigLIP, siglip_loss


def brute_force_siglip(image, text, scale, bias, ids):
    total = 0.0
    for i in range(image.shape[0]):
        for j in range(text.shape[0]):
            label = 1.0 if ids[i] == ids[j] else -1.0
            logit = scale * torch.dot(image[i], text[j]) + bias
            total = total - torch.log(torch.sigmoid(label * logit))
    return total / image.shape[0]


embeddings = unit_embeddings


def test_siglip_matches_brute_force_with_gradients():
    image, text = embeddings(6, 8, seed=0)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 1, 2, 2, 3, 4])
    ours = siglip_loss(image, text, scale, bias, ids=ids, ids_all=ids)
    ref = brute_force_siglip(image, text, scale, bias, ids)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)
    ours_grads = torch.autograd.grad(ours, (image, text, scale, bias))
    ref_grads = torch.autograd.grad(ref, (image, text, scale, bias))
    for a, b in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # without ids the diagonal is the positive
    no_ids = siglip_loss(image, text, scale, bias)
    assert no_ids.item() == pytest.approx(
        brute_force_siglip(image, text, scale, bias, torch.arange(6)).item(), rel=1e-10
    )


def test_siglip_local_vs_global_equals_whole_batch():
    world, b = 2, 3
    image, text = embeddings(world * b, 8, seed=1)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    whole = siglip_loss(image, text, scale, bias)

    def rank_loss(r):
        return siglip_loss(image[r * b : (r + 1) * b], text, scale, bias, offset=r * b)

    assert_rank_shares_equal_whole(rank_loss, whole, (image, text), world)


def test_siglip_bias_is_a_trained_parameter_and_logged():
    term = SigLIP(init_bias=-10.0)
    assert term.logit_bias.requires_grad and term.logit_bias.item() == -10.0
    image, text = (x.detach().float() for x in embeddings(4, 8, seed=2))
    out = Objective({"siglip": term})(image, text, torch.tensor(10.0))
    out["loss"].backward()
    assert term.logit_bias.grad is not None and out["sched/siglip_bias"].item() == -10.0


def test_schedules():
    warm = Linear(0.05, 0.2, steps=100)
    assert [warm(0), warm(50), warm(100), warm(1000)] == pytest.approx([0.05, 0.125, 0.2, 0.2])
    cos = Cosine(0.1, 0.01, steps=10)
    assert [cos(0), cos(5), cos(10)] == pytest.approx([0.1, 0.055, 0.01])
    assert Linear(1.0, 2.0, steps=0)(0) == 2.0
    with pytest.raises(ValueError):
        Linear(0, 1, steps=-1)


def test_scheduled_temperature_replaces_the_learned_scale():
    image, text = (x.detach().float() for x in embeddings(5, 8, seed=3))
    objective = Objective({"infonce": InfoNCE()}, temperature=Linear(0.1, 0.05, steps=10))
    out = objective(image, text, torch.tensor(1.0), step=10)
    assert out["sched/temperature"].item() == pytest.approx(0.05)
    expected = Objective({"infonce": InfoNCE()})(image, text, torch.tensor(20.0))["loss"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert math.isfinite(out["loss"].item())


def test_a_scheduled_temperature_is_clamped_like_the_learned_scale():
    """The learned logit scale stops at max_logit_scale; a schedule towards 0 stops there too, and the
    temperature logged is the one used."""
    image, text = (x.detach().float() for x in embeddings(5, 8, seed=4))
    objective = Objective(
        {"infonce": InfoNCE()}, temperature=Linear(0.1, 0.001, steps=10), max_logit_scale=50.0
    )
    unclamped = objective(image, text, torch.tensor(1.0), step=0)
    assert unclamped["sched/temperature"].item() == pytest.approx(0.1)
    clamped = objective(image, text, torch.tensor(1.0), step=10)  # the schedule says 0.001, i.e. scale 1000
    assert clamped["sched/temperature"].item() == pytest.approx(1 / 50.0)
    at_max = Objective({"infonce": InfoNCE()})(image, text, torch.tensor(50.0))["loss"]
    assert clamped["loss"].item() == pytest.approx(at_max.item(), rel=1e-6)
    with pytest.raises(ValueError, match="max_logit_scale"):
        Objective({"infonce": InfoNCE()}, max_logit_scale=0.0)


@pytest.mark.parametrize("model", ["small", "open_clip"])
def test_the_loss_config_clamps_at_the_models_max_logit_scale(model, tmp_path):
    from conftest import compose_config
    from hydra.utils import instantiate

    cfg = compose_config(
        [f"model={model}", "model.max_logit_scale=40", "loss.temperature_schedule=cosine"], tmp_path
    )
    objective = instantiate(cfg.loss.objective)
    assert objective.min_temperature == pytest.approx(1 / 40)
