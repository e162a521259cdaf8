import io
import json
import tarfile
from collections import Counter
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from autoglm_train.build import build_zeroshot
from autoglm_train.data.labelled import (
    image_folder_batches,
    image_folder_classes,
    labelled_shard_batches,
    prompt_names,
)
from autoglm_train.data.shapes import CELLS, COLOURS, SHAPES, SIZES, Shape, captions_for, position_name
from autoglm_train.data.shapes_zeroshot import SHAPES_TASKS, shapes_zeroshot_batches, shapes_zeroshot_samples
from autoglm_train.data.tokenizer import train_bpe
from autoglm_train.eval.zeroshot import (
    LabelledImages,
    build_classifier,
    evaluate_zeroshot,
    zeroshot_accuracy,
    zeroshot_metrics,
)
from autoglm_train.model.dual_encoder import DualEncoder
from autoglm_train.model.towers import ImageTower, TextTower

CONTEXT = 24


@pytest.fixture(scope="module")
def tokenizer():
    """A BPE trained on shapes captions: every word the shapes prompts use, as in a real run."""
    captions = [
        c
        for kind in SHAPES
        for colour in COLOURS
        for size in SIZES
        for r, col in CELLS
        for c in captions_for([Shape(kind, colour, size, r, col)])
    ]
    return train_bpe(captions, vocab_size=200, context_length=CONTEXT)


def bag_of_tokens_encoder(vocab_size: int, dim: int = 16, seed: int = 0):
    """A fake text encoder: mean of fixed random token embeddings over non-padding, normalized."""
    table = torch.randn(vocab_size, dim, generator=torch.Generator().manual_seed(seed))

    def encode_text(tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens != 0).float()[..., None]
        return F.normalize((table[tokens] * mask).sum(1) / mask.sum(1), dim=-1)

    return encode_text


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


# --------------------------------------------------------------------------- classifier


def test_classifier_is_normalized_mean_of_normalized_prompt_embeddings(tokenizer):
    encode_text = bag_of_tokens_encoder(tokenizer.vocab_size)
    classnames = ["circle", "square", "triangle"]
    templates = ["a {}", "a small red {} at the centre", "there is a large {} at the top left"]
    got = build_classifier(
        encode_text, tokenizer, classnames, templates, batch_size=4
    )  # batches split classes
    rows = []
    for name in classnames:
        emb = torch.stack(
            [F.normalize(encode_text(tokenizer([t.format(name)]))[0], dim=0) for t in templates]
        )
        rows.append(F.normalize(emb.mean(0), dim=0))
    torch.testing.assert_close(got, torch.stack(rows))
    assert got.shape == (3, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))


def test_classifier_renormalizes_unnormalized_text_embeddings(tokenizer):
    encode_text = bag_of_tokens_encoder(tokenizer.vocab_size)
    scaled = build_classifier(
        lambda t: 7.0 * encode_text(t), tokenizer, ["red", "blue"], ["a {}", "a {} one"]
    )
    torch.testing.assert_close(
        scaled, build_classifier(encode_text, tokenizer, ["red", "blue"], ["a {}", "a {} one"])
    )
    with pytest.raises(ValueError, match="at least one"):
        build_classifier(encode_text, tokenizer, [], ["a {}"])


# --------------------------------------------------------------------------- accuracy


def label_batches(labels: list[int], batch_size: int):
    """'Images' that are just their label: a fake image encoder can read the class off them."""
    images = torch.tensor(labels, dtype=torch.float32)[:, None]
    return [
        (images[i : i + batch_size], torch.tensor(labels[i : i + batch_size]))
        for i in range(0, len(labels), batch_size)
    ]


def test_oracle_encoder_is_always_right():
    classifier = F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    labels = [i % 6 for i in range(20)]
    out = zeroshot_accuracy(lambda x: classifier[x[:, 0].long()], classifier, label_batches(labels, 7))
    assert out["top1"] == 1.0 and out["top5"] == 1.0 and out["samples"] == 20
    assert out["per_class"] == [1.0] * 6 and out["mean_per_class"] == 1.0


def indexed_batches(labels: list[int]):
    """One batch of 'images' [label, position], so the fake encoder can pick per image."""
    images = torch.tensor([[y, i] for i, y in enumerate(labels)], dtype=torch.float32)
    return [(images, torch.tensor(labels))]


def test_half_wrong_encoder_and_topk_clipped_to_num_classes():
    classifier = torch.eye(4)
    labels = [0, 1, 2, 3, 0, 1, 2, 3]
    # the first four images look like the next class, the last four like their own
    looks_like = torch.tensor([1, 2, 3, 0, 0, 1, 2, 3])
    out = zeroshot_accuracy(
        lambda x: classifier[looks_like[x[:, 1].long()]], classifier, indexed_batches(labels)
    )
    assert out["top1"] == 0.5
    assert out["top5"] == 1.0  # 4 classes: every class is in the top 5
    assert out["per_class"] == [0.5] * 4 and out["samples"] == 8


def test_topk_with_known_rankings_over_eight_classes():
    classifier = torch.eye(8)
    # image i scores the classes in a known order in which its true class sits at rank where[i]
    labels = [0, 1, 2, 3, 4]
    where = [0, 1, 4, 5, 7]
    embeddings = []
    for y, r in zip(labels, where, strict=True):
        order = [c for c in range(8) if c != y]
        order.insert(r, y)
        embeddings.append(torch.tensor([8.0 - order.index(c) for c in range(8)]))
    emb = torch.stack(embeddings)
    out = zeroshot_accuracy(
        lambda x: emb[x[:, 1].long()], classifier, indexed_batches(labels), topk=(1, 2, 5)
    )
    assert out["top1"] == pytest.approx(1 / 5)
    assert out["top2"] == pytest.approx(2 / 5)
    assert out["top5"] == pytest.approx(3 / 5)
    assert out["per_class"][:5] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert all(np.isnan(out["per_class"][5:]))  # classes without samples
    assert out["mean_per_class"] == pytest.approx(1 / 5)


# --------------------------------------------------------------------------- loaders


def png_bytes(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder_reads_back_labels(tmp_path):
    classes = {"golden_retriever": (200, 0, 0), "cat": (0, 200, 0), "zebra": (0, 0, 200)}
    for name, colour in classes.items():
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), colour).save(tmp_path / name / f"{i}.{['png', 'jpg', 'webp'][i]}")
        (tmp_path / name / "notes.txt").write_text("not an image")
    assert image_folder_classes(tmp_path) == ["cat", "golden_retriever", "zebra"]
    assert prompt_names(image_folder_classes(tmp_path)) == ["cat", "golden retriever", "zebra"]
    batches = list(image_folder_batches(tmp_path, to_tensor, batch_size=4))
    assert [len(y) for _, y in batches] == [4, 4, 1]
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # each image's dominant channel is its class's colour channel: cat green, retriever red, zebra blue
    assert images.mean(dim=(2, 3)).argmax(dim=1).tolist() == [1, 1, 1, 0, 0, 0, 2, 2, 2]


def write_tar(path, samples: list[tuple[str, bytes, dict]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image, meta in samples:
            for ext, data in (("png", image), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_labelled_shards_read_back_int_and_name_labels(tmp_path):
    classnames = ["red", "green", "sea blue"]
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200)]
    labels = [0, "green", 2, "sea_blue", 1]
    want = [0, 1, 2, 2, 1]
    samples = [
        (f"s{i:03d}", png_bytes(colours[w]), {"label": y})
        for i, (y, w) in enumerate(zip(labels, want, strict=True))
    ]
    write_tar(tmp_path / "a-000000.tar", samples[:3])
    write_tar(tmp_path / "a-000001.tar", samples[3:])
    shards = str(tmp_path / "a-{000000..000001}.tar")
    batches = list(labelled_shard_batches(shards, to_tensor, batch_size=2, classnames=classnames))
    images = torch.cat([x for x, _ in batches])
    assert torch.cat([y for _, y in batches]).tolist() == want
    assert images.mean(dim=(2, 3)).argmax(dim=1).tolist() == want
    write_tar(tmp_path / "bad.tar", [("x", png_bytes((0, 0, 0)), {"label": "mauve"})])
    with pytest.raises(ValueError, match="mauve"):
        list(labelled_shard_batches(str(tmp_path / "bad.tar"), to_tensor, 2, classnames))
    write_tar(tmp_path / "nolabel.tar", [("x", png_bytes((0, 0, 0)), {"class": 1})])
    with pytest.raises(ValueError, match="no 'label'"):
        list(labelled_shard_batches(str(tmp_path / "nolabel.tar"), to_tensor, 2, classnames))


# --------------------------------------------------------------------------- shapes


def drawn_shape(image: Image.Image) -> tuple[str, tuple[int, ...], int]:
    """(kind, fill colour, number of distinct non-background colours) read off the pixels."""
    a = np.asarray(image).astype(int)
    background = a[0, 0]  # a corner is never covered: shapes stay inside their cell, 1 px from its border
    fg = (a != background).any(-1)
    colours = {tuple(c) for c in a[fg]}
    ys, xs = np.nonzero(fg)
    box = fg[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    fill = box.mean()
    widest_row = box.sum(1).argmax() / (box.shape[0] - 1)
    if fill > 0.9:
        kind = "square"
    elif fill > 0.7:
        kind = "circle"
    else:
        kind = "triangle" if widest_row > 0.8 else "diamond"
    return kind, next(iter(colours)), len(colours)


def test_shapes_samples_have_one_shape_labelled_as_drawn():
    samples = shapes_zeroshot_samples(48, seed=3, image_size=96)
    for image, label in samples:
        kind, fill, n_colours = drawn_shape(image)
        assert n_colours == 1  # one shape, one fill colour
        assert kind == label["shape"]
        assert np.abs(np.subtract(fill, COLOURS[label["colour"]])).max() <= 20  # the render's jitter
    shapes = Counter(label["shape"] for _, label in samples)
    colours = Counter(label["colour"] for _, label in samples)
    assert set(shapes) == set(SHAPES) and max(shapes.values()) - min(shapes.values()) <= 1
    assert set(colours) == set(COLOURS) and max(colours.values()) - min(colours.values()) <= 1


def test_shapes_samples_are_deterministic_per_seed():
    a, b, c = (shapes_zeroshot_samples(10, seed, 32) for seed in (1, 1, 2))
    assert [(x.tobytes(), y) for x, y in a] == [(x.tobytes(), y) for x, y in b]
    assert [x.tobytes() for x, _ in a] != [x.tobytes() for x, _ in c]


def test_shapes_prompts_use_only_caption_words_and_hide_the_other_attribute():
    caption_words = set(" ".join([*SIZES, *COLOURS, *SHAPES, "a at"]).split())
    caption_words |= {w for r, c in CELLS for w in position_name(r, c).split()}
    for task, other in (("shape", COLOURS), ("colour", SHAPES)):
        classnames, templates = SHAPES_TASKS[task]
        assert len(set(templates)) == len(templates)
        for t in templates:
            assert t.count("{}") == 1 and set(t.format("x").split()) - {"x"} <= caption_words
        # every nuisance value appears equally often, so no class prompt leans to one of them
        counts = Counter(w for t in templates for w in t.split() if w in other)
        assert set(counts) == set(other) and len(set(counts.values())) == 1
    assert SHAPES_TASKS["shape"][0] == list(SHAPES) and SHAPES_TASKS["colour"][0] == list(COLOURS)


def evaluate_shapes_zeroshot(encode_image, encode_text, tokenizer, transform, n, image_size, batch_size=100):
    """The shapes tasks as the run builds them (build_zeroshot), on ``n`` images."""
    tasks = build_zeroshot(SHAPES_CFG, OmegaConf.create({"image_size": image_size})).tasks
    source = LabelledImages(partial(shapes_zeroshot_batches, n=n, image_size=image_size), tasks)
    return evaluate_zeroshot(encode_image, encode_text, tokenizer, source, transform, batch_size)


SHAPES_CFG = OmegaConf.create({"task": "shapes", "templates": ["a photo of a {}."]})


def test_shapes_tasks_render_at_the_runs_image_size():
    for data_cfg, size in (({"prepare": {"image_size": 48}, "image_size": 32}, 48), ({"image_size": 40}, 40)):
        source = build_zeroshot(SHAPES_CFG, OmegaConf.create(data_cfg))
        images, labels = next(iter(source.batches(to_tensor, 4)))
        assert images.shape == (4, 3, size, size) and labels.shape == (4, 2)
        assert [t.prefix for t in source.tasks] == ["zeroshot/shape_", "zeroshot/colour_"]


def test_the_evaluation_package_knows_no_dataset():
    import subprocess
    import sys

    code = (
        "import sys, autoglm_train.eval.zeroshot, autoglm_train.eval.retrieval, "
        "autoglm_train.eval.run_metrics, autoglm_train.eval.benchmark;"
        "print(sorted(m for m in sys.modules if m.startswith('autoglm_train.data')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_evaluate_shapes_zeroshot_with_a_tiny_untrained_model(tokenizer):
    torch.manual_seed(0)
    model = DualEncoder(
        ImageTower("resnet18"),
        TextTower(tokenizer.vocab_size, width=32, depth=1, heads=2, context_length=CONTEXT),
        embed_dim=16,
    ).eval()
    out = evaluate_shapes_zeroshot(
        model.encode_image, model.encode_text, tokenizer, to_tensor, n=24, image_size=32, batch_size=10
    )
    assert set(out) == {"zeroshot/shape_top1", "zeroshot/colour_top1", "zeroshot/colour_top5"}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in out.values())
    assert out["zeroshot/colour_top5"] >= out["zeroshot/colour_top1"]


def test_evaluate_shapes_zeroshot_with_a_perfect_colour_reader(tokenizer):
    """An image encoder that embeds the fill colour like the text side embeds the colour word scores 1."""
    encode_text = bag_of_tokens_encoder(tokenizer.vocab_size)
    colour_rows = build_classifier(encode_text, tokenizer, *SHAPES_TASKS["colour"])
    names = list(COLOURS)

    def encode_image(images: torch.Tensor) -> torch.Tensor:
        fills = [
            drawn_shape(Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)))[1]
            for x in images
        ]
        nearest = [min(names, key=lambda n: np.abs(np.subtract(f, COLOURS[n])).sum()) for f in fills]
        return colour_rows[[names.index(n) for n in nearest]]

    out = evaluate_shapes_zeroshot(encode_image, encode_text, tokenizer, to_tensor, n=16, image_size=48)
    assert out["zeroshot/colour_top1"] == 1.0


def test_training_entry_runs_the_configured_folder_task(tmp_path, tokenizer):
    for name, colour in (("red_square", (220, 30, 30)), ("blue_square", (30, 30, 220))):
        (tmp_path / name).mkdir()
        for k in range(3):
            (tmp_path / name / f"{k}.png").write_bytes(png_bytes(colour))
    model = DualEncoder(
        ImageTower("resnet18"),
        TextTower(tokenizer.vocab_size, width=32, depth=1, heads=2, context_length=CONTEXT),
        embed_dim=16,
    ).train()
    cfg = OmegaConf.create(
        {
            "task": "folder",
            "root": str(tmp_path),
            "shards": None,
            "label_key": "label",
            "classnames": None,
            "templates": ["a {}", "the {}"],
            "batch_size": 4,
        }
    )
    out = zeroshot_metrics(model, tokenizer, build_zeroshot(cfg), to_tensor, cfg.batch_size, "cpu")
    assert set(out) == {"zeroshot/top1", "zeroshot/top5", "zeroshot/mean_per_class"}
    assert out["zeroshot/top5"] == 1.0 and 0 <= out["zeroshot/top1"] <= 1
    assert model.training  # restored after evaluating in eval mode
    with pytest.raises(ValueError, match="needs eval.zeroshot.root"):
        build_zeroshot(OmegaConf.merge(cfg, {"root": None}))
    with pytest.raises(ValueError, match="must be null, shapes, folder or shards"):
        build_zeroshot(OmegaConf.merge(cfg, {"task": "imagenet"}))
