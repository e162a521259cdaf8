"""Recall@K with several captions per image, against a brute-force loop."""

import pytest
import torch
import torch.nn.functional as F

from autoglm_train.eval.retrieval import retrieval_metrics


def brute_force(image, image_ids, text, text_ids, k):
    sims = image @ text.T
    i2t = t2i = 0
    for i in range(image.shape[0]):
        order = sorted(range(text.shape[0]), key=lambda j: -sims[i, j].item())[:k]
        i2t += any(text_ids[j] == image_ids[i] for j in order)
    for j in range(text.shape[0]):
        order = sorted(range(image.shape[0]), key=lambda i: -sims[i, j].item())[:k]
        t2i += any(image_ids[i] == text_ids[j] for i in order)
    return i2t / image.shape[0], t2i / text.shape[0]


@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_matches_brute_force_with_several_captions(chunk_size):
    g = torch.Generator().manual_seed(0)
    n_images, d = 40, 16
    image = F.normalize(torch.randn(n_images, d, generator=g), dim=-1)
    image_ids = torch.randperm(1000, generator=g)[:n_images]
    # 1 to 5 captions per image, each a noisy copy of its image, shuffled
    owners = torch.cat(
        [torch.full((int(c),), i) for i, c in enumerate(torch.randint(1, 6, (n_images,), generator=g))]
    )
    text = F.normalize(image[owners] + 0.9 * torch.randn(len(owners), d, generator=g), dim=-1)
    perm = torch.randperm(len(owners), generator=g)
    text, text_ids = text[perm], image_ids[owners[perm]]

    metrics = retrieval_metrics(image, image_ids, text, text_ids, chunk_size=chunk_size)
    for k in (1, 5, 10):
        i2t, t2i = brute_force(image, image_ids, text, text_ids, k)
        assert metrics[f"i2t_r{k}"] == pytest.approx(i2t)
        assert metrics[f"t2i_r{k}"] == pytest.approx(t2i)
    assert 0 < metrics["i2t_r1"] < 1  # the fixture is neither trivial nor hopeless
    assert metrics["r1_mean"] == pytest.approx((metrics["i2t_r1"] + metrics["t2i_r1"]) / 2)


def test_identical_embeddings_give_perfect_recall_and_duplicates_are_refused():
    image = F.normalize(torch.randn(10, 8), dim=-1)
    ids = torch.arange(10)
    assert retrieval_metrics(image, ids, image, ids)["r1_mean"] == 1.0
    with pytest.raises(ValueError, match="unique"):
        retrieval_metrics(image, torch.zeros(10, dtype=torch.long), image, ids)


def test_non_finite_embeddings_are_an_error_not_a_recall():
    image = F.normalize(torch.randn(8, 4), dim=-1)
    ids = torch.arange(8)
    text = image.clone()
    text[3, 1] = float("nan")
    with pytest.raises(ValueError, match="1 of 8 text embeddings are not finite"):
        retrieval_metrics(image, ids, text, ids)
    with pytest.raises(ValueError, match="8 of 8 image embeddings"):
        retrieval_metrics(torch.full_like(image, float("inf")), ids, image, ids)
