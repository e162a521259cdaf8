"""Caption hard negatives (loss.text_negatives): what the generators make, and how InfoNCE scores them."""

import json
import random
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from autoglm_train.data.caption_negatives import (
    CaptionNegatives,
    caption_negatives,
    shuffle_negative,
    swap_negative,
)
from autoglm_train.data.shapes import generate
from autoglm_train.losses.infonce import InfoNCE, infonce_loss, keyed_infonce_loss
from autoglm_train.losses.objective import Objective

FREE_TEXT = [
    "A man riding a horse on a beach.",
    "Two dogs play with a red ball near a wooden bench",
    "a young girl holding a blue umbrella in the rain",
    "A plate with a sandwich and a cup of coffee on a table.",
    "an old car parked next to a big truck",
    "a dog",
    "Sunset.",
    "the the the",
]


def shapes_captions(n=300):
    return [
        c
        for s in generate(n, 0, "train", False, 16, group_fraction=0.5)
        for c in json.loads(s["json"])["captions"]
    ]


def bag(caption: str) -> Counter:
    return Counter(w.lower() for w in re.findall(r"[A-Za-z0-9']+", caption))


@pytest.mark.parametrize("make", [swap_negative, shuffle_negative])
def test_negatives_keep_the_word_multiset_and_never_equal_the_caption(make):
    rng = random.Random(0)
    made = 0
    for caption in shapes_captions() + FREE_TEXT:
        for _ in range(3):
            negative = make(caption, rng)
            if negative is None:
                continue
            made += 1
            assert negative != caption
            assert bag(negative) == bag(caption)
            # only words move: spaces and punctuation stay where they were
            assert re.sub(r"[A-Za-z0-9']+", "w", negative) == re.sub(r"[A-Za-z0-9']+", "w", caption)
    assert made > 1000


def test_swap_exchanges_two_words_of_one_class_between_shapes():
    rng = random.Random(1)
    captions = [c for c in shapes_captions() if " and " in c]  # two or three shapes
    for caption in captions:
        negative = swap_negative(caption, rng)
        assert negative is not None  # two shapes always differ in a word of some class (their cells at least)
        moved = [(a, b) for a, b in zip(caption.split(), negative.split(), strict=True) if a != b]
        assert len(moved) == 2 and moved[0] == moved[1][::-1]
    # a single shape has no partner to exchange with
    assert swap_negative("a small red circle at the top left", rng) is None
    assert swap_negative("A man riding a horse.", rng) == "A horse riding a man."


def test_a_caption_without_a_negative_gets_an_invalid_slot():
    negatives, valid = CaptionNegatives("shuffle", count=2)(
        ["a dog", "a red dog on a blue bench"], random.Random(0)
    )
    assert negatives[:2] == ["a dog", "a dog"] and valid == [False, False, True, True]
    assert caption_negatives("none") is None and caption_negatives(None) is None
    with pytest.raises(ValueError, match="loss.text_negatives"):
        caption_negatives("reverse")


def brute_force_i2t_t2i(image, text, negatives, valid, scale):
    """Per-row cross-entropies by hand: an image against every caption and every valid negative, a caption
    against every image."""
    total = 0.0
    n = image.shape[0]
    for i in range(n):
        columns = [scale * image[i] @ text[j] for j in range(n)]
        columns += [scale * image[i] @ negatives[k] for k in range(len(negatives)) if valid[k]]
        total += -(columns[i] - torch.logsumexp(torch.stack(columns), 0)) / (2 * n)
        rows = torch.stack([scale * text[i] @ image[j] for j in range(n)])
        total += -(rows[i] - torch.logsumexp(rows, 0)) / (2 * n)
    return total


def unit(*shape, seed):
    return F.normalize(
        torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1
    )


def test_infonce_with_caption_negatives_equals_brute_force():
    image, text, negatives = unit(6, 8, seed=0), unit(6, 8, seed=1), unit(12, 8, seed=2)
    valid = torch.tensor([True, False] * 6)
    scale = torch.tensor(7.0, dtype=torch.float64)
    got = infonce_loss(image, text, image, text, scale, 0, negatives, valid)
    assert got.item() == pytest.approx(
        brute_force_i2t_t2i(image, text, negatives, valid, scale).item(), abs=1e-10
    )
    # an invalid slot counts for nothing: the same as leaving it out
    kept = infonce_loss(image, text, image, text, scale, 0, negatives[valid])
    assert got.item() == pytest.approx(kept.item(), abs=1e-12)
    # negatives make the image->text task harder, never easier
    assert got > infonce_loss(image, text, image, text, scale)


def test_negatives_are_never_scored_text_to_image():
    image, text, negatives = unit(4, 8, seed=3), unit(4, 8, seed=4), unit(4, 8, seed=5)
    image.requires_grad_(True)
    negatives.requires_grad_(True)
    scale = torch.tensor(5.0, dtype=torch.float64)
    infonce_loss(image, text, image, text, scale, 0, negatives).backward()
    # a negative is pushed away from the images only through the image->text rows: its gradient is the
    # softmax weight it took there
    logits = scale * image.detach() @ torch.cat([text, negatives.detach()]).T
    weights = F.softmax(logits, dim=1)[:, 4:]
    want = scale * weights.T @ image.detach() / (2 * 4)
    torch.testing.assert_close(negatives.grad, want)


def test_keyed_infonce_with_negatives_masks_invalid_and_keeps_positives():
    image, text = unit(4, 8, seed=6), unit(4, 8, seed=7)
    keys_i, keys_t = unit(10, 8, seed=8), unit(10, 8, seed=9)
    negatives = unit(4, 8, seed=10)
    ids = torch.tensor([1, 1, 2, 3])
    key_ids = torch.tensor([1, 1, 2, 3, 4, 5, 6, 7, 8, 1])
    scale = torch.tensor(6.0, dtype=torch.float64)
    valid = torch.tensor([True, False, True, False])
    args = (image, text, keys_i, keys_t, ids, key_ids, scale)
    for alpha, image_m, text_m in ((0.0, None, None), (0.4, unit(4, 8, seed=11), unit(4, 8, seed=12))):
        got = keyed_infonce_loss(*args, image_m, text_m, alpha, negatives, valid)
        kept = keyed_infonce_loss(*args, image_m, text_m, alpha, negatives[valid])
        assert torch.isfinite(got) and got.item() == pytest.approx(kept.item(), abs=1e-12)
    # with alpha 0, brute force: each image against its positives (spread evenly) among all keys + negatives
    got = keyed_infonce_loss(*args, None, None, 0.0, negatives, valid)
    total = 0.0
    for i in range(4):
        columns = torch.cat([scale * keys_t @ image[i], scale * negatives[valid] @ image[i]])
        positives = (key_ids == ids[i]).nonzero().flatten()
        total += -(columns[positives] - torch.logsumexp(columns, 0)).mean() / 8
        rows = scale * keys_i @ text[i]
        total += -(rows[(key_ids == ids[i]).nonzero().flatten()] - torch.logsumexp(rows, 0)).mean() / 8
    assert got.item() == pytest.approx(total.item(), abs=1e-10)


def test_objective_gathers_negatives_and_takes_the_momentum_models_view():
    image, text, negatives = unit(4, 8, seed=13), unit(4, 8, seed=14), unit(4, 8, seed=15)
    valid = torch.tensor([True, True, False, True])
    scale = torch.tensor(4.0, dtype=torch.float64)
    objective = Objective({"infonce": InfoNCE()})
    out = objective(image, text, scale, torch.arange(4), text_neg=negatives, text_neg_valid=valid)
    assert out["loss"].item() == pytest.approx(
        infonce_loss(image, text, image, text, scale, 0, negatives[valid]).item()
    )
    # with momentum keys, the momentum model's negatives are the extra keys
    momentum = (unit(4, 8, seed=16), unit(4, 8, seed=17), unit(4, 8, seed=18))
    out = objective(
        image, text, scale, torch.arange(4), momentum=momentum, text_neg=negatives, text_neg_valid=valid
    )
    want = keyed_infonce_loss(
        image, text, momentum[0], momentum[1], torch.arange(4), torch.arange(4), scale, None, None, 0.0,
        momentum[2][valid],
    )  # fmt: skip
    assert out["loss"].item() == pytest.approx(want.item(), abs=1e-12)


def test_training_batches_carry_reproducible_negatives(tmp_path):
    from torchvision.transforms.functional import to_tensor

    from autoglm_train.data.shapes import write_shapes_shards
    from autoglm_train.data.shards import build_pipeline
    from autoglm_train.data.tokenizer import train_bpe

    made = write_shapes_shards(
        tmp_path, n_train=40, n_val=10, image_size=16, samples_per_shard=40, n_val_binding=0
    )
    tokenizer = train_bpe(shapes_captions(50), 300, 128)  # whole captions: compared after decoding

    def first_batch():
        pipeline = build_pipeline(
            made["train"], tokenizer=tokenizer, transform=to_tensor, batch_size=16, train=True, seed=3,
            text_negatives=CaptionNegatives("swap"),
        )  # fmt: skip
        pipeline.set_epoch(0)
        return next(iter(pipeline))

    batch, again = first_batch(), first_batch()
    assert batch["text_neg"].shape[0] == 16 and batch["text_neg_valid"].shape == (16,)
    assert torch.equal(batch["text_neg"], again["text_neg"])  # a pure function of (seed, epoch, rank, worker)
    for row in range(16):
        caption, negative = (tokenizer.decode(t) for t in (batch["text"][row], batch["text_neg"][row]))
        if batch["text_neg_valid"][row]:
            assert negative != caption and sorted(negative.split()) == sorted(caption.split())
        else:
            assert negative == caption and " and " not in caption  # a single shape: nothing to swap
    assert batch["text_neg_valid"].any()
