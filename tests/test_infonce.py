"""InfoNCE against a brute-force loop, and the local-vs-global split against one process."""

import math

import pytest
import torch
from conftest import assert_rank_shares_equal_whole, unit_embeddings

from autoglm_train.losses.infonce import InfoNCE, infonce_loss
from autoglm_train.losses.objective import Objective


def brute_force_infonce(image, text, scale):
    n = image.shape[0]
    total = 0.0
    for i in range(n):  # image i against every caption, then caption i against every image
        i2t = [scale * torch.dot(image[i], text[j]) for j in range(n)]
        t2i = [scale * torch.dot(text[i], image[j]) for j in range(n)]
        total = total - (i2t[i] - torch.logsumexp(torch.stack(i2t), 0))
        total = total - (t2i[i] - torch.logsumexp(torch.stack(t2i), 0))
    return total / (2 * n)


embeddings = unit_embeddings


@pytest.mark.parametrize("n,d,scale", [(1, 4, 14.3), (7, 16, 1 / 0.07), (12, 8, 100.0)])
def test_values_and_gradients_match_brute_force(n, d, scale):
    image, text = embeddings(n, d, seed=n)
    scale_t = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    ours = infonce_loss(image, text, image, text, scale_t)
    ref_image, ref_text = image.detach().clone().requires_grad_(), text.detach().clone().requires_grad_()
    ref_scale = scale_t.detach().clone().requires_grad_()
    ref = brute_force_infonce(ref_image, ref_text, ref_scale)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-12)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(image.grad, ref_image.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(text.grad, ref_text.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(scale_t.grad, ref_scale.grad, rtol=1e-9, atol=1e-12)


def test_perfect_alignment_is_near_zero_and_random_is_near_log_n():
    n = 64
    image, _ = embeddings(n, 128, seed=0)
    assert infonce_loss(image, image, image, image, torch.tensor(100.0)).item() < 1e-3
    _, text = embeddings(n, 128, seed=1)
    assert infonce_loss(image, text, image, text, torch.tensor(1.0)).item() == pytest.approx(
        math.log(n), rel=0.05
    )


@pytest.mark.parametrize("world", [2, 4])
def test_local_vs_global_equals_whole_batch(world):
    """Each simulated rank: its rows against the gathered batch; the mean over ranks of the losses, and
    the sum of their gradients / world (DDP's average), equal the single-process loss and gradient."""
    b, d = 5, 8
    image, text = embeddings(world * b, d, seed=world)
    scale = torch.tensor(20.0, dtype=torch.float64)
    whole = infonce_loss(image, text, image, text, scale)

    def rank_loss(rank):
        rows = slice(rank * b, (rank + 1) * b)
        return infonce_loss(image[rows], text[rows], image, text, scale, offset=rank * b)

    assert_rank_shares_equal_whole(rank_loss, whole, (image, text), world)


def test_objective_weights_terms_and_rejects_unknown_names():
    image, text = embeddings(6, 8, seed=3)
    objective = Objective({"infonce": InfoNCE()}, weights={"infonce": 0.5})
    out = objective(image, text, torch.tensor(10.0))
    assert out["loss"].item() == pytest.approx(0.5 * out["loss/infonce"].item())
    with pytest.raises(ValueError, match="unknown terms"):
        Objective({"infonce": InfoNCE()}, weights={"infonse": 1.0})
    with pytest.raises(ValueError, match="empty"):
        Objective({})


def test_bf16_autocast_close_to_fp32():
    image, text = embeddings(32, 64, seed=5)
    image, text = image.detach().float(), text.detach().float()
    ref = infonce_loss(image, text, image, text, torch.tensor(14.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = infonce_loss(image, text, image, text, torch.tensor(14.0))
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), rel=2e-2)
