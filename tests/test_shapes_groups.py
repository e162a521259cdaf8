"""The embedded set's held-out design: hard-negative groups differ in exactly one attribute, captions are
unique, and validation scores each attribute within its groups."""

import io
import json
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from autoglm_train.data.shapes import GRID, GROUP_ATTRIBUTES, HELD_OUT_ATTRIBUTES, generate
from autoglm_train.eval.retrieval import group_recall

FIELDS = {"shape": {0}, "colour": {1}, "size": {2}, "position": {3, 4}}  # in [kind, colour, size, row, col]
SIZE = 64


@pytest.fixture(scope="module")
def held_out():
    return [
        (json.loads(s["json"]), np.asarray(Image.open(io.BytesIO(s["png"]))))
        for s in generate(300, seed=1, split="val", unique_captions=True, image_size=SIZE, group_fraction=1.0)
    ]


def groups_of(samples):
    groups = defaultdict(list)
    for meta, pixels in samples:
        groups[meta["group"]].append((meta, pixels))
    return groups


def cells_mask(cells) -> np.ndarray:
    """Pixels inside the given grid cells, one pixel of rasterization slack around each."""
    mask = np.zeros((SIZE, SIZE), bool)
    cell = SIZE / GRID
    for row, col in cells:
        top, left = int(row * cell) - 1, int(col * cell) - 1
        mask[max(0, top) : int((row + 1) * cell) + 2, max(0, left) : int((col + 1) * cell) + 2] = True
    return mask


def test_every_held_out_image_is_in_a_group_and_captions_are_unique(held_out):
    assert all("group" in meta and meta["varies"] in GROUP_ATTRIBUTES for meta, _ in held_out)
    captions = [c for meta, _ in held_out for c in meta["captions"]]
    assert len(captions) == len(set(captions)) == 2 * len(held_out)
    # the attributes take turns: group counts per attribute differ by at most one
    kinds = Counter(members[0][0]["varies"] for members in groups_of(held_out).values())
    assert set(kinds) == set(HELD_OUT_ATTRIBUTES) and max(kinds.values()) - min(kinds.values()) <= 1


def test_a_group_differs_in_exactly_its_attribute_of_one_shape(held_out):
    for name, members in groups_of(held_out).items():
        varies = members[0][0]["varies"]
        if len(members) < 2:
            continue  # the split's last group may be cut short
        assert len(members) <= GROUP_ATTRIBUTES[varies]
        base_meta, base_pixels = members[0]
        values = set()
        for meta, pixels in members[1:]:
            assert meta["varies"] == varies and len(meta["shapes"]) == len(base_meta["shapes"])
            changed = [
                (i, {f for f in range(5) if a[f] != b[f]})
                for i, (a, b) in enumerate(zip(base_meta["shapes"], meta["shapes"], strict=True))
                if a != b
            ]
            assert len(changed) == 1, f"{name}: {len(changed)} shapes differ"
            index, fields = changed[0]
            assert fields <= FIELDS[varies] and fields, f"{name} varies {varies} but changed fields {fields}"
            values.add(tuple(meta["shapes"][index][f] for f in sorted(FIELDS[varies])))
            # pixels change only in the varied shape's cell(s): same background, tints and jitter elsewhere
            old, new = base_meta["shapes"][index], meta["shapes"][index]
            outside = ~cells_mask({(old[3], old[4]), (new[3], new[4])})
            assert (base_pixels[outside] == pixels[outside]).all(), f"{name}: pixels differ elsewhere"
            assert (base_pixels != pixels).any(), f"{name}: two images of the group are identical"
        assert len(values) == len(members) - 1, f"{name}: a value repeats within the group"


def test_training_groups_take_the_configured_share():
    metas = [json.loads(s["json"]) for s in generate(2000, 0, "train", False, 16, group_fraction=0.5)]
    share = sum("group" in m for m in metas) / len(metas)
    assert abs(share - 0.5) < 0.01
    # a group's images are written one after another
    order = [m["group"] for m in metas if "group" in m]
    runs = sum(1 for a, b in zip(order, order[1:], strict=False) if a != b) + 1
    assert runs == len(set(order))
    assert all("group" not in m for m in generate_metas(200, 0.0))


def generate_metas(n, fraction):
    return [json.loads(s["json"]) for s in generate(n, 0, "train", False, 16, group_fraction=fraction)]


def brute_force_group_recall(image_emb, image_ids, text_emb, text_image_ids, groups, kinds, names):
    text_rows = [image_ids.tolist().index(i) for i in text_image_ids.tolist()]
    sizes = Counter(groups.tolist())
    out = {}
    for k, name in enumerate(names):
        i2t, t2i = [], []
        for row in range(len(image_ids)):
            if kinds[row] != k or sizes[int(groups[row])] < 2:
                continue
            candidates = [j for j in range(len(text_rows)) if groups[text_rows[j]] == groups[row]]
            best = max(candidates, key=lambda j: float(image_emb[row] @ text_emb[j]))
            i2t.append(text_rows[best] == row)
        for j, row in enumerate(text_rows):
            if kinds[row] != k or sizes[int(groups[row])] < 2:
                continue
            candidates = [r for r in range(len(image_ids)) if groups[r] == groups[row]]
            best = max(candidates, key=lambda r: float(text_emb[j] @ image_emb[r]))
            t2i.append(best == row)
        if i2t:
            out[f"hard_r1_{name}"] = (np.mean(i2t) + np.mean(t2i)) / 2
    return out


DEVICES = [
    "cpu",
    # the module calls it with embeddings on the training GPU and ids gathered there too
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU (gpu_checks.sh runs it)"),
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_group_recall_equals_brute_force(device):
    g = torch.Generator().manual_seed(0)
    n = 40
    image_ids = torch.randperm(1000, generator=g)[:n] * 7 - 3000  # any int ids
    groups = torch.tensor([i // 4 for i in range(n - 1)] + [99])  # groups of 4, and one of a single image
    kinds = torch.tensor([(i // 4) % 3 for i in range(n - 1)] + [0])
    kinds[:4] = -1  # one group in no kind
    text_image_ids = image_ids.repeat_interleave(2)[torch.randperm(2 * n, generator=g)]
    image_emb = torch.randn(n, 8, generator=g)
    text_emb = image_emb[[image_ids.tolist().index(i) for i in text_image_ids.tolist()]]
    text_emb = text_emb + 1.5 * torch.randn(text_emb.shape, generator=g)  # noisy: some hits, some misses
    names = ("shape", "colour", "position")
    on = [t.to(device) for t in (image_emb, image_ids, text_emb, text_image_ids, groups, kinds)]
    got = group_recall(*on, names)
    want = brute_force_group_recall(image_emb, image_ids, text_emb, text_image_ids, groups, kinds, names)
    assert got.keys() == want.keys() == {f"hard_r1_{k}" for k in names}
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12)
    assert 0 < min(got.values()) and max(got.values()) < 1  # the case is not degenerate


def test_held_out_batches_carry_each_images_group(tmp_path):
    from torchvision.transforms.functional import to_tensor

    from autoglm_train.data.shapes import write_shapes_shards
    from autoglm_train.data.shards import build_pipeline, sample_id_to_int
    from autoglm_train.data.tokenizer import train_bpe

    made = write_shapes_shards(
        tmp_path, n_train=20, n_val=30, image_size=16, samples_per_shard=20, val_shards=2, n_val_binding=0
    )
    metas = {
        sample_id_to_int(m["id"]): m
        for m in (json.loads(s["json"]) for s in generate(30, 0, "val", True, 16, group_fraction=1.0))
    }
    tokenizer = train_bpe((c for m in metas.values() for c in m["captions"]), 100, 32)
    kinds = ("size", "shape", "colour")  # "position" left out: its groups are in no kind
    batches = list(
        build_pipeline(
            made["val"],
            tokenizer=tokenizer,
            transform=to_tensor,
            batch_size=8,
            train=False,
            group_kinds=kinds,
        )
    )
    seen = 0
    for batch in batches:
        for image_id, group, kind in zip(batch["id"], batch["group"], batch["group_kind"], strict=True):
            meta = metas[int(image_id)]
            if meta["varies"] in kinds:
                assert (int(group), int(kind)) == (
                    sample_id_to_int(meta["group"]),
                    kinds.index(meta["varies"]),
                )
            else:
                assert (int(group), int(kind)) == (0, -1)
            seen += 1
    assert seen == 30
    plain = next(
        iter(build_pipeline(made["val"], tokenizer=tokenizer, transform=to_tensor, batch_size=8, train=False))
    )
    assert "group" not in plain  # only asked for


def words(caption: str) -> Counter:
    return Counter(caption.split())


def test_binding_groups_hold_the_same_words_and_mean_different_scenes():
    samples = [
        (json.loads(s["json"]), np.asarray(Image.open(io.BytesIO(s["png"]))))
        for s in generate(120, 3, "val-binding", True, SIZE, 1.0, None, 1000, ("binding",))
    ]
    groups = [m for m in groups_of(samples).values() if len(m) > 1]
    assert len(groups) >= 40 and {len(m) for m in groups} == {2, 3}
    swaps = Counter()
    for members in groups:
        base_meta, base_pixels = members[0]
        swaps[base_meta["swaps"]] += 1
        scenes = {frozenset(map(tuple, meta["shapes"])) for meta, _ in members}
        assert len(scenes) == len(members)  # each image a different scene...
        for meta, pixels in members:
            assert meta["varies"] == "binding" and len(meta["shapes"]) >= 2
            # ...told by the same words: every caption of the group is a permutation of every other
            for caption in meta["captions"]:
                assert words(caption) == words(base_meta["captions"][0])
            if meta is not base_meta:
                assert not set(meta["captions"]) & set(base_meta["captions"])
                assert (pixels != base_pixels).any()
                # one attribute (or the cell) exchanged between two shapes, the others untouched
                changed = [
                    i
                    for i, (a, b) in enumerate(zip(base_meta["shapes"], meta["shapes"], strict=True))
                    if a != b
                ]
                assert len(changed) == 2
                a, b = (base_meta["shapes"][i] for i in changed)
                x, y = (meta["shapes"][i] for i in changed)
                fields = {"colour": [1], "shape": [0], "size": [2], "position": [3, 4]}[meta["swaps"]]
                for f in range(5):
                    want = (b[f], a[f]) if f in fields else (a[f], b[f])
                    assert (x[f], y[f]) == want
    assert set(swaps) == {"colour", "shape", "size", "position"}


def test_retrieval_leaves_group_only_kinds_out():
    from autoglm_train.eval.retrieval import retrieval_rows

    parts = {
        "id": torch.tensor([10, 11, 12, 13]),
        "group_kind": torch.tensor([0, 1, 1, -1]),
        "text_id": torch.tensor([10, 10, 11, 12, 13, 13]),
    }
    images, texts = retrieval_rows(parts, ("shape", "binding"), ("binding",))
    assert images.tolist() == [True, False, False, True]
    assert texts.tolist() == [True, True, False, False, True, True]
    images, texts = retrieval_rows(parts, ("shape", "binding"), ())
    assert images.all() and texts.all()
