"""Queues, the EMA update and its schedule, and the InfoNCE/triplet terms against momentum keys."""

import math

import pytest
import torch
import torch.nn.functional as F

from autoglm_train.losses.infonce import InfoNCE, keyed_infonce_loss
from autoglm_train.losses.objective import Objective
from autoglm_train.losses.queue import FeatureQueue
from autoglm_train.losses.triplet import TripletLoss, triplet_loss
from autoglm_train.model.dual_encoder import DualEncoder
from autoglm_train.model.momentum import MomentumEncoder, momentum_at
from autoglm_train.model.towers import ImageTower, TextTower


@pytest.mark.parametrize("size,batches", [(10, [3, 3, 3, 3, 2]), (8, [4, 4, 4]), (5, [7, 1, 2]), (6, [1, 1])])
def test_queue_equals_concatenation_of_past_batches_keeping_the_last_k(size, batches):
    queue = FeatureQueue(size, dim=4)
    seen_keys, seen_ids = [], []
    next_id = 0
    for n in batches:
        keys, ids = torch.randn(n, 4), torch.arange(next_id, next_id + n)
        next_id += n
        queue.enqueue(keys, ids)
        seen_keys.append(keys)
        seen_ids.append(ids)
        features, queued_ids = queue.contents()
        torch.testing.assert_close(features, torch.cat(seen_keys)[-size:])
        assert torch.equal(queued_ids, torch.cat(seen_ids)[-size:])
    again = FeatureQueue(size, dim=4)
    again.load_state_dict(queue.state_dict())
    for a, b in zip(again.contents(), queue.contents(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="config asks for"):
        FeatureQueue(size + 1, dim=4).load_state_dict(queue.state_dict())


def tiny_model():
    torch.manual_seed(0)
    return DualEncoder(ImageTower("resnet18"), TextTower(20, 16, 1, 2, 8), embed_dim=8)


def test_ema_update_formula_and_no_gradient():
    model = tiny_model()
    ema = MomentumEncoder(model, momentum=0.9)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model, step=1)
    online = model.state_dict()
    for name, value in ema.module.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.9 * before[name] + 0.1 * online[name], rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_momentum_schedules():
    assert momentum_at(123, 0.99, "constant", 1000) == 0.99
    assert momentum_at(0, 0.99, "cosine", 1000) == pytest.approx(0.99)
    assert momentum_at(500, 0.99, "cosine", 1000) == pytest.approx(0.995)
    assert momentum_at(1000, 0.99, "cosine", 1000) == pytest.approx(1.0)
    assert momentum_at(250, 0.99, "cosine", 1000) == pytest.approx(1 - 0.01 * (1 + math.cos(math.pi / 4)) / 2)
    with pytest.raises(ValueError, match="momentum.schedule"):
        MomentumEncoder(tiny_model(), 0.99, "linear")


def brute_force_keyed(
    image, text, image_keys, text_keys, ids, key_ids, scale, image_m=None, text_m=None, alpha=0.0
):
    total = 0.0
    for query, keys, query_m in ((image, text_keys, image_m), (text, image_keys, text_m)):
        for i in range(query.shape[0]):
            logits = torch.stack([scale * torch.dot(query[i], keys[j]) for j in range(keys.shape[0])])
            log_probs = logits - torch.logsumexp(logits, 0)
            positives = [j for j in range(keys.shape[0]) if key_ids[j] == ids[i]]
            targets = torch.zeros(keys.shape[0], dtype=query.dtype)
            targets[positives] = 1.0 / len(positives)
            if alpha:
                soft = torch.softmax(
                    torch.stack([scale * torch.dot(query_m[i], keys[j]) for j in range(keys.shape[0])]), 0
                )
                targets = alpha * soft + (1 - alpha) * targets
            total = total - (targets * log_probs).sum() / query.shape[0]
    return total / 2


def unit(n, d, g):
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_infonce_with_queue_matches_brute_force(alpha):
    g = torch.Generator().manual_seed(0)
    image, text = unit(5, 8, g).requires_grad_(), unit(5, 8, g).requires_grad_()
    image_m, text_m = unit(5, 8, g), unit(5, 8, g)
    ids = torch.tensor([10, 11, 12, 13, 14])
    # keys: this batch's momentum embeddings, then a queue holding an older copy of image 12 and strangers
    queue_ids = torch.tensor([12, 99, 98, 13])
    image_keys, text_keys = torch.cat([image_m, unit(4, 8, g)]), torch.cat([text_m, unit(4, 8, g)])
    key_ids = torch.cat([ids, queue_ids])
    scale = torch.tensor(12.0, dtype=torch.float64)
    ours = keyed_infonce_loss(image, text, image_keys, text_keys, ids, key_ids, scale, image_m, text_m, alpha)
    ref = brute_force_keyed(image, text, image_keys, text_keys, ids, key_ids, scale, image_m, text_m, alpha)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)
    for a, b in zip(
        torch.autograd.grad(ours, (image, text)), torch.autograd.grad(ref, (image, text)), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_objective_with_queue_scores_keys_masks_ids_and_enqueues():
    g = torch.Generator().manual_seed(1)
    objective = Objective({"infonce": InfoNCE(), "triplet": TripletLoss(0.3, "all")}, queue_size=6)
    ids = torch.arange(4)
    for step in range(
        3
    ):  # the same ids come back: queued keys of the same sample are positives, not negatives
        image, text, image_m, text_m = (unit(4, 8, g).float() for _ in range(4))
        out = objective(image, text, torch.tensor(10.0), ids=ids, step=step, momentum=(image_m, text_m))
        assert torch.isfinite(out["loss"])
    features, queued = objective.queues["text"].contents()
    assert features.shape == (6, 8) and queued.tolist() == [2, 3, 0, 1, 2, 3]
    # the queued-keys InfoNCE equals the brute force with the queue as it was before this step
    image, text, image_m, text_m = (unit(4, 8, g).float() for _ in range(4))
    img_q, q_ids = objective.queues["image"].contents()
    txt_q, _ = objective.queues["text"].contents()
    out = objective(image, text, torch.tensor(10.0), ids=ids, step=3, momentum=(image_m, text_m))
    ref = brute_force_keyed(
        image.double(),
        text.double(),
        torch.cat([image_m, img_q]).double(),
        torch.cat([text_m, txt_q]).double(),
        ids,
        torch.cat([ids, q_ids]),
        torch.tensor(10.0, dtype=torch.float64),
    )
    assert out["loss/infonce"].item() == pytest.approx(ref.item(), rel=1e-5)
    # triplet: queue entries are extra negatives, same-id entries excluded
    expected = triplet_loss(
        image,
        text,
        image,
        text,
        0.3,
        "all",
        ids=ids,
        ids_all=ids,
        image_extra=img_q,
        text_extra=txt_q,
        extra_ids=q_ids,
    )
    assert out["loss/triplet"].item() == pytest.approx(expected.item(), rel=1e-6)
    no_queue = triplet_loss(image, text, image, text, 0.3, "all", ids=ids, ids_all=ids)
    assert out["loss/triplet"].item() != pytest.approx(no_queue.item())


def test_non_finite_keys_are_not_enqueued():
    g = torch.Generator().manual_seed(2)
    objective = Objective({"infonce": InfoNCE()}, queue_size=8)
    ids = torch.arange(4)
    image, text, image_m, text_m = (unit(4, 8, g).float() for _ in range(4))
    objective(image, text, torch.tensor(10.0), ids=ids, step=0, momentum=(image_m, text_m))
    before = [t.clone() for t in objective.queues["image"].contents()]
    image_m[1, 0] = torch.nan  # a corrupt input reaches the momentum encoder too
    out = objective(image, text, torch.tensor(10.0), ids=ids + 4, step=1, momentum=(image_m, text_m))
    assert not torch.isfinite(out["loss"])  # the step itself is stopped or skipped by the trainer
    after = objective.queues["image"].contents()
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_queue_without_momentum_is_a_config_error(tiny_cfg):
    from autoglm_train import train

    with pytest.raises(ValueError, match="momentum.enabled=true"):
        train.run(tiny_cfg("loss.queue_size=64"))


def test_a_queue_with_only_siglip_is_a_config_error():
    from autoglm_train.losses.objective import Objective
    from autoglm_train.losses.siglip import SigLIP

    with pytest.raises(ValueError, match="no term uses a queue"):
        Objective({"siglip": SigLIP()}, queue_size=64)


@pytest.mark.slow
def test_momentum_updates_once_per_optimizer_step_not_per_micro_batch(tiny_cfg, monkeypatch):
    from autoglm_train import train

    steps = []
    original = MomentumEncoder.update

    def counting(self, model, step=None):
        steps.append(step)
        return original(self, model, step=step)

    monkeypatch.setattr(MomentumEncoder, "update", counting)
    metrics = train.run(
        tiny_cfg("momentum.enabled=true", "trainer.accumulate_grad_batches=2", "trainer.max_steps=3")
    )
    assert metrics["train/steps"] == 3 and metrics["train/samples"] == 3 * 2 * 64
    assert steps == [0, 1, 2]  # one update per optimizer step (its 0-based index), six micro-batches
