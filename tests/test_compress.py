"""INT8 quantization close to fp32, export that loads without our code, the embed tool, and the whole
compression job on a tiny trained checkpoint."""

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, shapes_set

from autoglm_train.compress.export import export_model
from autoglm_train.compress.prune import convert_text_tower, estimate_flops
from autoglm_train.compress.quantize import quantize_model
from autoglm_train.compress.report import count_flops
from autoglm_train.data.tokenizer import train_bpe
from autoglm_train.embed import load_index
from autoglm_train.embed import main as embed_main
from autoglm_train.model.dual_encoder import DualEncoder
from autoglm_train.model.towers import ImageTower, TextTower

REPO = Path(__file__).resolve().parents[1]
PREPROCESS = {
    "input_size": [3, 32, 32],
    "interpolation": "bilinear",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "crop_pct": 1.0,
}


@pytest.fixture(scope="module")
def tokenizer():
    captions = [f"a {s} {c} circle at the top left" for s in ("small", "large") for c in ("red", "blue")]
    return train_bpe(captions * 20, vocab_size=200, context_length=16, min_frequency=1)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return DualEncoder(
        ImageTower("resnet18"),
        TextTower(tokenizer.vocab_size, width=64, depth=2, heads=4, context_length=16),
        32,
    ).eval()


def batch(tokenizer, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), tokenizer(["a small red circle at the top left"] * n)


def test_report_flops_count_both_towers_whatever_kernel_runs_them(model, tokenizer):
    images, tokens = batch(tokenizer)
    flops = count_flops(model, images, tokens)
    # the eval-mode TransformerEncoder runs a fused kernel FlopCounterMode cannot see; the converted
    # (exactly equal) tower runs plain ops: the count must not depend on which
    converted = copy.deepcopy(model)
    convert_text_tower(converted.text_tower)
    assert count_flops(converted, images, tokens) == flops
    text = estimate_flops(model.text_tower, tokens)
    assert text > 0 and flops > estimate_flops(model.image_tower, images) + text


def test_int8_embeddings_stay_close_to_fp32(model, tokenizer):
    images, tokens = batch(tokenizer)
    quantized = quantize_model(model, [batch(tokenizer, 16, seed=s)[0] for s in range(1, 4)])
    # the conv tower is statically quantized, the transformer and projections dynamically
    assert (
        "Quantized" in type(quantized.text_proj).__name__
        or "quantized" in type(quantized.text_proj).__module__
    )
    with torch.no_grad():
        for a, b in (
            (model.encode_image(images), quantized.encode_image(images)),
            (model.encode_text(tokens), quantized.encode_text(tokens)),
        ):
            assert F.cosine_similarity(a, b).min() > 0.98


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys, torch
    from tokenizers import Tokenizer
    path, inputs = sys.argv[1], torch.load(sys.argv[2])
    image = torch.jit.load(path + "/image_encoder.pt")
    text = torch.jit.load(path + "/text_encoder.pt")
    tokenizer = Tokenizer.from_file(path + "/tokenizer.json")
    tokens = torch.tensor([e.ids for e in tokenizer.encode_batch(inputs["captions"])])
    with torch.no_grad():
        out = {"image": image(inputs["images"]), "text": text(tokens), "tokens": tokens}
    assert not [m for m in sys.modules if m.startswith("autoglm_train")], "our code was imported"
    torch.save(out, sys.argv[3])
    """
)


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_exported_model_loads_in_a_fresh_process_without_our_code(model, tokenizer, tmp_path, variant):
    images, _ = batch(tokenizer)
    served = model if variant == "fp32" else quantize_model(model, [batch(tokenizer, 16, 1)[0]])
    export_model(served, tokenizer, tmp_path / "export", PREPROCESS, images)
    captions = ["a small red circle at the top left", "a large blue circle", "red"]
    torch.save({"images": images, "captions": captions}, tmp_path / "in.pt")
    (tmp_path / "load.py").write_text(FRESH_PROCESS)
    # -I: isolated, so neither the working directory nor PYTHONPATH can slip our package in
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            str(tmp_path / "load.py"),
            str(tmp_path / "export"),
            str(tmp_path / "in.pt"),
            str(tmp_path / "out.pt"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = torch.load(tmp_path / "out.pt")
    assert torch.equal(out["tokens"], tokenizer(captions))
    with torch.no_grad():
        torch.testing.assert_close(out["image"], served.encode_image(images), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out["text"], served.encode_text(tokenizer(captions)), atol=1e-5, rtol=1e-4)
    meta = json.loads((tmp_path / "export" / "export.json").read_text())
    assert meta["preprocess"] == PREPROCESS and meta["embed_dim"] == 32


def test_embed_writes_an_index_and_answers_text_queries(model, tokenizer, shapes_dir, tmp_path, capsys):
    export_model(model, tokenizer, tmp_path / "export", PREPROCESS, batch(tokenizer)[0])
    shards = str(shapes_set(shapes_dir) / "val-*.tar")
    code = embed_main(
        [
            "--model",
            str(tmp_path / "export"),
            "--shards",
            shards,
            "--out",
            str(tmp_path / "index"),
            "--query",
            "a red circle",
            "--k",
            "3",
            "--no-progress",
        ]
    )
    assert code == 0
    # no pickle: tensors in safetensors, the rest JSON
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["embeddings.safetensors", "index.json"]
    index = load_index(tmp_path / "index")
    assert index["image"].shape == (200, 32) and len(index["ids"]) == len(index["captions"]) == 200
    printed = capsys.readouterr().out
    assert "200 image embeddings" in printed and "'a red circle':" in printed and "  3. " in printed
    # querying the saved index answers as the fresh one did
    assert (
        embed_main(
            [
                "--model",
                str(tmp_path / "export"),
                "--index",
                str(tmp_path / "index"),
                "--query",
                "a red circle",
                "--k",
                "3",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.split("'a red circle':")[1] == printed.split("'a red circle':")[1]
    # an index of the old format (a torch pickle) is not unpickled
    torch.save(index, tmp_path / "old.pt")
    assert (
        embed_main(["--model", str(tmp_path / "export"), "--index", str(tmp_path / "old.pt"), "--query", "x"])
        == 2
    )
    assert "no longer read" in capsys.readouterr().err
    assert (
        embed_main(
            [
                "--model",
                str(tmp_path / "export"),
                "--shards",
                str(tmp_path / "no-*.tar"),
                "--out",
                str(tmp_path / "x.pt"),
            ]
        )
        == 2
    )


@pytest.mark.slow
def test_compression_job_on_a_trained_checkpoint_writes_the_report(shapes_dir, tmp_path):
    env = {**os.environ, "AUTOGLM_DATA_DIR": str(shapes_dir), "PYTHONUNBUFFERED": "1"}
    train_dir, job_dir = tmp_path / "train", tmp_path / "compress"
    trained = subprocess.run(
        [sys.executable, "-m", "autoglm_train", *TINY, "logger=none", f"hydra.run.dir={train_dir}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    args = [
        f"ckpt={train_dir}/checkpoints/last.ckpt",
        "prune.ratio=0.5",
        "prune.iterations=2",
        "finetune.steps=4",
        "finetune.batch_size=16",
        "data.num_workers=0",
        "quantize.calibration_batches=2",
        "prune.calibration_batches=1",
        "report.latency_batch=16",
        "report.repeats=2",
        "report.sweep_ratios=[0.3]",
        "report.sweep_finetune_steps=2",
        "lowrank_heads.enabled=true",
        "lowrank_heads.rank=8",
        "lowrank_heads.finetune_steps=2",
        "progress_bar=false",
        f"hydra.run.dir={job_dir}",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "autoglm_train.compress", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads((job_dir / "report.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    lowrank = "heads rank 8/8 + distilled"
    assert list(rows) == [
        "original",
        lowrank,
        "pruned",
        "pruned + distilled",
        "int8",
        "pruned + distilled + int8",
    ]
    # TINY's heads: 512 -> 64 and 64 -> 64, factorized at rank 8
    saved = (512 * 64 + 64 * 64) - 8 * (512 + 64 + 64 + 64)
    assert rows["original"]["params"] - rows[lowrank]["params"] == saved
    assert rows["pruned"]["params"] < rows["original"]["params"]
    assert rows["pruned"]["flops"] < rows["original"]["flops"]
    assert rows["int8"]["file_bytes"] < rows["original"]["file_bytes"] / 2
    for row in rows.values():
        assert row["latency_s"] > 0 and 0 <= row["val/r1_mean"] <= 1
        assert (job_dir / "exports").is_dir()
    assert (job_dir / "report.md").read_text().count("\n|") >= 6
    assert (job_dir / "pruning_sweep.png").stat().st_size > 1000
    assert report["sweep"][0]["ratio"] == 0.3
