"""Triplet loss and mining against brute-force loops over every (anchor, positive, negative) triple."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_rank_shares_equal_whole

from autoglm_train.losses.objective import Objective
from autoglm_train.losses.schedules import Linear
from autoglm_train.losses.triplet import TripletLoss, select_triplets, triplet_loss, valid_negatives


def brute_force(image, text, margin, mining, ids=None):
    """Chosen triples as {(direction, anchor, negative)} and the mean hinge over them (autograd-able)."""
    n = image.shape[0]
    chosen, hinges = set(), []
    for direction, anchors, others in (("i2t", image, text), ("t2i", text, image)):
        for a in range(n):
            s_ap = torch.dot(anchors[a], others[a])
            negatives = [j for j in range(n) if j != a and (ids is None or ids[j] != ids[a])]
            if mining == "hard":
                negatives = (
                    [max(negatives, key=lambda j: torch.dot(anchors[a], others[j]).item())]
                    if negatives
                    else []
                )
            for j in negatives:
                s_an = torch.dot(anchors[a], others[j])
                if mining == "all" and not margin - s_ap + s_an > 0:
                    continue
                if mining == "semihard" and not (s_ap - margin < s_an < s_ap):
                    continue
                chosen.add((direction, a, j))
                hinges.append((margin - s_ap + s_an).clamp(min=0))
    loss = torch.stack(hinges).sum() / len(hinges) if hinges else (image.sum() + text.sum()) * 0
    return chosen, loss


def chosen_by_ours(image, text, margin, mining, ids=None):
    n = image.shape[0]
    valid = valid_negatives(n, n, 0, ids, ids)
    out = set()
    for direction, a, o in (("i2t", image, text), ("t2i", text, image)):
        sim = a.double() @ o.double().T
        mask = select_triplets(sim, sim.diagonal(), valid, margin, mining)
        out |= {(direction, int(i), int(j)) for i, j in mask.nonzero()}
    return out


def embeddings(n, d, seed, dtype=torch.float64, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(image + noise * torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return image.to(dtype), text.to(dtype)


@pytest.mark.parametrize("mining", ["all", "semihard", "hard"])
@pytest.mark.parametrize("with_ids", [False, True])
def test_values_triplets_and_gradients_match_brute_force(mining, with_ids):
    image, text = embeddings(10, 8, seed=1)
    ids = torch.tensor([0, 1, 2, 2, 3, 4, 4, 4, 5, 6]) if with_ids else None  # several captions of one image
    margin = 0.3
    image.requires_grad_(), text.requires_grad_()
    ours = triplet_loss(image, text, image, text, margin, mining, ids=ids, ids_all=ids)
    ref_image, ref_text = image.detach().clone().requires_grad_(), text.detach().clone().requires_grad_()
    chosen, ref = brute_force(ref_image, ref_text, margin, mining, ids)
    assert chosen, "fixture should select some triplets"
    assert chosen_by_ours(image.detach(), text.detach(), margin, mining, ids) == chosen
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-12)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(image.grad, ref_image.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(text.grad, ref_text.grad, rtol=1e-9, atol=1e-12)


def test_same_id_items_are_never_negatives():
    image, text = embeddings(4, 8, seed=2)
    text = text.clone()
    text[1] = image[0]  # caption 1 is a perfect match for image 0, and belongs to the same image (id 7)
    ids = torch.tensor([7, 7, 1, 2])
    for mining in ("all", "semihard", "hard"):
        chosen = chosen_by_ours(image, text, 0.5, mining, ids)
        assert not any({a, j} == {0, 1} for _, a, j in chosen)


def test_no_valid_triplet_gives_zero_with_a_gradient_not_nan():
    image = F.normalize(torch.eye(4, 8, dtype=torch.float64), dim=-1).requires_grad_()
    text = image.detach().clone().requires_grad_()
    for mining in ("all", "semihard"):  # perfectly separated: nothing violates a 0.1 margin
        loss = triplet_loss(image, text, image, text, 0.1, mining)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(image.grad).all() and torch.isfinite(text.grad).all()
    one = torch.ones(1, 8, dtype=torch.float64, requires_grad=True)  # a single pair has no negatives at all
    loss = triplet_loss(one, one, one, one, 0.2, "hard")
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(one.grad).all()


@pytest.mark.parametrize("mining", ["all", "semihard", "hard"])
def test_bf16_inputs_match_brute_force_on_the_same_values(mining):
    image, text = embeddings(12, 16, seed=3, dtype=torch.bfloat16)
    ours = triplet_loss(image, text, image, text, 0.3, mining)
    assert ours.dtype == torch.float32
    chosen, ref = brute_force(image.double(), text.double(), 0.3, mining)
    assert chosen_by_ours(image, text, 0.3, mining) == chosen
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("mining", ["all", "semihard", "hard"])
def test_local_vs_global_with_global_count_equals_whole_batch(mining):
    world, b = 3, 4
    image, text = embeddings(world * b, 8, seed=4)
    image.requires_grad_(), text.requires_grad_()
    whole = triplet_loss(image, text, image, text, 0.3, mining)
    total = len(brute_force(image.detach(), text.detach(), 0.3, mining)[0])

    def rank_loss(rank):
        rows = slice(rank * b, (rank + 1) * b)
        return triplet_loss(
            image[rows],
            text[rows],
            image,
            text,
            0.3,
            mining,
            offset=rank * b,
            global_count=lambda c: (torch.tensor(float(total)), world),
        )

    assert_rank_shares_equal_whole(rank_loss, whole, (image, text), world)


def test_margin_warmup_is_scheduled_and_reported():
    image, text = embeddings(6, 8, seed=5)
    objective = Objective({"triplet": TripletLoss(margin=Linear(0.0, 0.4, steps=10), mining="all")})
    assert objective(image, text, torch.tensor(10.0), step=0)["sched/margin"].item() == 0.0
    assert objective(image, text, torch.tensor(10.0), step=5)["sched/margin"].item() == pytest.approx(0.2)
    out = objective(image, text, torch.tensor(10.0), step=50)
    assert out["sched/margin"].item() == pytest.approx(0.4)
    assert out["loss/triplet"].item() == pytest.approx(
        triplet_loss(image, text, image, text, 0.4, "all").item()
    )


def test_unknown_mining_is_a_clear_error():
    with pytest.raises(ValueError, match="loss.mining"):
        TripletLoss(mining="hardest")
