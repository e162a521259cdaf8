"""``evaluate benchmark.dataset=...`` scores clip_benchmark's webdataset layout as its own CLI does: a tiny
open_clip run of ours is trained, exported to an open_clip weights file, and both tools score the same
classification and retrieval sets (written here, in the layout its converter writes) to within 1e-6.
"""

from __future__ import annotations

import builtins
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, compose_config, train_run
from PIL import Image, ImageDraw
from test_evaluate import open_clip_overrides
from test_open_clip import TinyCLIP

from autoglm_train import evaluate
from autoglm_train.config_check import ConfigError, check_evaluate_config
from autoglm_train.eval.benchmark import classification_figures, retrieval_figures
from autoglm_train.export_open_clip import export_checkpoint

# six classes (acc5 is reported from five), unevenly filled so mean per-class recall is not top-1
CLASSES = ["red disc", "green bar", "blue ring", "yellow cross", "white dot", "black square"]
COUNTS = [4, 3, 2, 2, 2, 1]
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 20), (250, 250, 250), (10, 10, 10)]
TEMPLATES = ["an image of the {c}", "{c}, drawn small", "a plain {c} on noise"]
CAPTIONS = [  # one to three captions an image
    ["a red disc on grey noise"],
    ["a green bar, tilted", "the green stroke"],
    ["blue ring", "a ring in blue", "one blue circle outline"],
    ["a yellow cross"],
    ["a white dot near the corner", "small white point"],
    ["black square", "a dark box"],
    ["red and green together"],
    ["noise only", "nothing drawn", "static"],
]


def picture(rng: np.random.Generator, colour, size: tuple[int, int]) -> bytes:
    """A PNG of noise with a coloured blob somewhere; sizes vary so resizing and cropping are exercised."""
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    x, y = int(rng.integers(0, size[0] // 2)), int(rng.integers(0, size[1] // 2))
    ImageDraw.Draw(image).ellipse([x, y, x + size[0] // 2, y + size[1] // 2], fill=colour)
    out = io.BytesIO()
    image.save(out, format="png")
    return out.getvalue()


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for index, sample in enumerate(samples):
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"s{index:07d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (path.parent / "nshards.txt").write_text(f"{len(list(path.parent.glob('*.tar')))}\n")


def sizes(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(28, 60)), int(rng.integers(28, 60))


@pytest.fixture(scope="module")
def benchmark_sets(tmp_path_factory) -> dict[str, Path]:
    """clip_benchmark's webdataset layout: <root>/test/{0,1}.tar + nshards.txt, and the metadata files."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("benchmarks")
    classes = root / "tiny_classes"
    labelled = [
        {"png": picture(rng, COLOURS[label], sizes(rng)), "cls": str(label).encode()}
        for label, count in enumerate(COUNTS)
        for _ in range(count)
    ]
    rng.shuffle(labelled)
    write_shard(classes / "test" / "0.tar", labelled[:8])
    write_shard(classes / "test" / "1.tar", labelled[8:])
    (classes / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (classes / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")

    captions = root / "tiny_captions"
    write_shard(
        captions / "test" / "0.tar",
        [
            {"png": picture(rng, COLOURS[i % 6], sizes(rng)), "txt": "\n".join(texts).encode()}
            for i, texts in enumerate(CAPTIONS)
        ],
    )
    (captions / "dataset_type.txt").write_text("retrieval\n")
    return {"tiny_classes": classes, "tiny_captions": captions}


def scalar(value):
    """``float`` that takes a one-element array as NumPy < 2.4 did."""
    return builtins.float(value.reshape(()) if isinstance(value, np.ndarray) else value)


def clip_benchmark_cli(monkeypatch, tmp_path: Path, name: str, root: Path, tiny: TinyCLIP, weights, *args):
    """clip_benchmark's CLI, in this process (the tiny architecture is registered here), in fp32.

    clip-benchmark 1.6.2's top-k accuracy ends in ``float()`` of a one-element array, which NumPy 2.4 refuses
    (LAION-AI/CLIP_benchmark#147): its module is given a ``float`` that accepts one, and its own code runs."""
    from clip_benchmark import cli
    from clip_benchmark.metrics import zeroshot_classification

    monkeypatch.setattr(zeroshot_classification, "float", scalar, raising=False)

    out = tmp_path / f"cli_{name}.json"
    argv = ["clip_benchmark", "eval", "--dataset", f"wds/{name}", "--dataset_root", str(root)]
    argv += ["--model", tiny.name, "--pretrained", str(weights), "--no_amp", "--num_workers", "0"]
    argv += ["--batch_size", "5", "--output", str(out), "--quiet", *args]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cli.main()
    return json.loads(out.read_text())["metrics"]


class Lookup:
    """A stand-in dual encoder: a text is a row of a random table, an image is its own (unnormalized)
    embedding, so both tools' metric code can be compared on the same numbers without a model."""

    def __init__(self, dim: int = 8):
        self.table = torch.randn(500, dim, generator=torch.Generator().manual_seed(3))
        self.rows: dict[str, int] = {}

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.rows.setdefault(t, len(self.rows)) for t in texts])

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return 3 * images


class Batches(list):
    """Batches as clip_benchmark's functions take a loader: iterable, with ``dataset.classes``."""

    def __init__(self, batches, classes=None):
        super().__init__(batches)
        self.dataset = type("Dataset", (), {"classes": classes})()


def test_the_figures_are_clip_benchmarks_metrics(monkeypatch):
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    monkeypatch.setattr(zeroshot_classification, "float", scalar, raising=False)
    g = torch.Generator().manual_seed(0)
    model = Lookup()
    classes = [f"class {i}" for i in range(7)]
    labels = torch.tensor([0] * 9 + [1] * 5 + [2] * 4 + [3] * 3 + [4] * 2 + [5, 6])
    images = torch.randn(len(labels), 8, generator=g) + 0.5 * model.table[labels]  # better than chance
    batches = Batches([(images[i : i + 4], labels[i : i + 4]) for i in range(0, len(labels), 4)], classes)
    theirs = zeroshot_classification.evaluate(
        model, batches, model.tokenize, classes, ["{c}", "a {c} here"], "cpu", amp=False
    )
    mine = classification_figures(
        model.encode_image, model.encode_text, model.tokenize, batches, classes, ["{c}", "a {c} here"]
    )
    assert mine["samples"] == len(labels) and theirs["mean_per_class_recall"] != theirs["acc1"]
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert mine[key] == pytest.approx(theirs[key], abs=1e-6), key

    # one to three captions an image; batches of 3 here, of 2 images there
    captions = [[f"caption {i}.{j}" for j in range(1 + i % 3)] for i in range(10)]
    images = torch.randn(10, 8, generator=g)
    for i, texts in enumerate(captions):
        images[i] += 0.7 * model.encode_text(model.tokenize(texts)).mean(0)
    theirs = zeroshot_retrieval.evaluate(
        model,
        [(images[i : i + 2], captions[i : i + 2]) for i in range(0, 10, 2)],
        model.tokenize,
        "cpu",
        amp=False,
        recall_k_list=[1, 3, 5],
    )
    mine = retrieval_figures(
        model.encode_image,
        model.encode_text,
        model.tokenize,
        [(images[i : i + 3], captions[i : i + 3]) for i in range(0, 10, 3)],
        recall_k=[5, 1, 3],
    )
    assert mine["images"] == 10 and mine["captions"] == sum(map(len, captions)) and len(theirs) == 6
    assert 0 < theirs["image_retrieval_recall@1"] < theirs["image_retrieval_recall@5"] < 1
    for key, value in theirs.items():
        assert mine[key] == pytest.approx(value, abs=1e-6), key


def ours(overrides: list[str], run_dir: Path) -> dict[str, float]:
    metrics = evaluate.run(compose_config([*overrides, "progress_bar=false"], run_dir, "evaluate"))
    assert json.loads((run_dir / "metrics.json").read_text()) == pytest.approx(metrics)
    return {k.removeprefix("benchmark/"): v for k, v in metrics.items() if k.startswith("benchmark/")}


@pytest.mark.slow
def test_a_trained_and_exported_open_clip_model_scores_as_in_clip_benchmark(
    benchmark_sets, shapes_dir, monkeypatch, tmp_path
):
    monkeypatch.setenv("AUTOGLM_DATA_DIR", str(shapes_dir))
    tiny = TinyCLIP(tmp_path / "tiny", "tiny-clip-bench")
    model_args = open_clip_overrides(tiny)
    tiny_no_text = [o for o in TINY if not o.startswith(("model.text_tower.", "model.embed_dim"))]
    train_run(
        [*tiny_no_text, *model_args, "trainer.max_steps=2", "trainer.val_check_interval=2"]
        + ["data.batch_size=16", "data.shuffle_buffer=16", "eval.zeroshot.task=null"],
        tmp_path / "train",
    )
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    exported, _ = export_checkpoint(ckpt, tmp_path / "exported.pt")

    classes = benchmark_sets["tiny_classes"]
    common = ["benchmark.batch_size=5", "benchmark.num_workers=0", "benchmark.dataset=wds/tiny_classes"]
    theirs = clip_benchmark_cli(monkeypatch, tmp_path, "tiny_classes", classes, tiny, exported)
    from_ckpt = ours([f"ckpt={ckpt}", *common, f"benchmark.root={classes}"], tmp_path / "ckpt")
    from_file = ours(  # the exported file as released weights
        [*model_args, f"model.pretrained={exported}", *common, f"benchmark.root={classes}"], tmp_path / "file"
    )
    assert set(theirs) == {"acc1", "acc5", "mean_per_class_recall"}
    assert from_ckpt["samples"] == from_file["samples"] == sum(COUNTS)
    for key, value in theirs.items():
        assert from_ckpt[key] == pytest.approx(value, abs=1e-6), key
        assert from_file[key] == pytest.approx(value, abs=1e-6), key

    captions = benchmark_sets["tiny_captions"]
    theirs = clip_benchmark_cli(
        monkeypatch, tmp_path, "tiny_captions", captions, tiny, exported,
        "--task", "zeroshot_retrieval", "--recall_k", "1", "2", "5",
    )  # fmt: skip
    scored = ours(
        [f"ckpt={ckpt}", "benchmark.batch_size=3", "benchmark.dataset=tiny_captions"]
        + [f"benchmark.root={captions}", "benchmark.recall_k=[1,2,5]"],
        tmp_path / "retrieval",
    )
    assert scored["images"] == len(CAPTIONS) and scored["captions"] == sum(map(len, CAPTIONS))
    assert len(theirs) == 6
    for key, value in theirs.items():
        assert scored[key] == pytest.approx(value, abs=1e-6), key


def test_a_benchmark_needs_its_directory_and_scores_it_alone(benchmark_sets, tmp_path):
    def problems(*overrides: str) -> str:
        with pytest.raises(ConfigError) as err:
            check_evaluate_config(compose_config(["model=open_clip", *overrides], tmp_path, "evaluate"))
        return str(err.value)

    classes = benchmark_sets["tiny_classes"]
    ok = ["benchmark.dataset=tiny_classes", f"benchmark.root={classes}"]
    check_evaluate_config(compose_config(["model=open_clip", *ok], tmp_path, "evaluate"))
    assert "benchmark.root=null: benchmark.dataset needs" in problems("benchmark.dataset=x")
    assert "train/nshards.txt is missing (splits here: test)" in problems(*ok, "benchmark.split=train")
    said = problems(*ok, "benchmark.recall_k=[0]", "trainer.precision=bf16-true", "eval.zeroshot.task=shapes")
    for expected in ("benchmark.recall_k=[0]", "trainer.precision=bf16-true", "eval.zeroshot.task"):
        assert expected in said
    (tmp_path / "bare" / "test").mkdir(parents=True)
    (tmp_path / "bare" / "test" / "nshards.txt").write_text("1\n")
    said = problems("benchmark.dataset=bare", f"benchmark.root={tmp_path / 'bare'}")
    assert "test/0.tar is missing" in said and "classnames.txt is missing" in said
