"""ONNX export that serves without torch or our code, INT8 on ONNX Runtime close to fp32, the embed tool
(faiss), and the whole compression job on a tiny trained checkpoint."""

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, shapes_set

from autoglm_train.compress.export import export_model, graphs_size
from autoglm_train.compress.prunable_text import convert_text_tower
from autoglm_train.compress.quantize import quantize_export, read_quantization
from autoglm_train.compress.report import count_flops, estimate_flops
from autoglm_train.compress.serving import OrtDualEncoder, load_exported
from autoglm_train.data.tokenizer import train_bpe
from autoglm_train.embed import load_index, query
from autoglm_train.embed import main as embed_main
from autoglm_train.embed import parser as embed_parser
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


@pytest.fixture(scope="module")
def exports(model, tokenizer, tmp_path_factory):
    """The tiny model exported to ONNX (``fp32``) and quantized by ONNX Runtime (``int8``)."""
    root = tmp_path_factory.mktemp("exports")
    export_model(model, tokenizer, root / "fp32", PREPROCESS, batch(tokenizer)[0])
    quantize_export(
        root / "fp32",
        root / "int8",
        [batch(tokenizer, 16, seed=s)[0] for s in (1, 2, 3)],
        [batch(tokenizer, 16, seed=1)[1]],
    )
    return root


def test_int8_graphs_run_int8_kernels_and_stay_close_to_fp32(model, tokenizer, exports):
    int8_ops = {
        name: {n.op_type for n in onnx.load(str(exports / "int8" / f"{name}_encoder.onnx")).graph.node}
        for name in ("image", "text")
    }
    # the conv tower statically (QDQ around every conv), the transformer dynamically (integer matmuls)
    assert {"QuantizeLinear", "DequantizeLinear"} <= int8_ops["image"]
    assert "MatMulInteger" in int8_ops["text"]
    assert graphs_size(exports / "int8") < graphs_size(exports / "fp32") / 3
    images, tokens = batch(tokenizer, 16, seed=5)
    served = OrtDualEncoder(exports / "int8")
    with torch.no_grad():
        image_cos = F.cosine_similarity(model.encode_image(images), served.encode_image(images))
        text_cos = F.cosine_similarity(model.encode_text(tokens), served.encode_text(tokens))
    assert image_cos.min() > 0.99
    # an untrained 64-wide transformer is int8's worst case (what counts, recall on a trained model, is
    # checked by the compression job's test); a broken graph would be near 0
    assert text_cos.min() > 0.85


def random_tokens(tokenizer, n: int, seed: int) -> torch.Tensor:
    """``n`` sequences of random tokens of random lengths, padded as the tokenizer pads."""
    g = torch.Generator().manual_seed(seed)
    length = tokenizer(["x"]).shape[1]
    tokens = torch.randint(3, tokenizer.vocab_size, (n, length), generator=g)
    lengths = torch.randint(4, length + 1, (n, 1), generator=g)
    return tokens.masked_fill(torch.arange(length) >= lengths, tokenizer.pad_id)


def test_quantize_exclude_auto_reaches_the_target_held_out_and_records_what_it_kept(
    tokenizer, exports, tmp_path
):
    # static QDQ on the text graph, the case that lost 10 points whole; the image graph left fp32 keeps
    # the test short
    calibration = [random_tokens(tokenizer, 32, seed=s) for s in (1, 2)]
    quantize_export(exports / "fp32", tmp_path / "auto", [], calibration, "none", "static", "auto", 0.99)
    done = read_quantization(tmp_path / "auto")
    assert done["image"] == {"mode": "none", "excluded": [], "nodes": 0}
    text = done["text"]
    assert text["reached"] and text["selection_cosine"] >= 0.99
    assert 0 < len(text["excluded"]) < text["nodes"] == len(text["effects"])
    # static QDQ's default op list is wider than its registry: the mask's Add and the Softmax are measured
    assert {"Add", "Softmax", "MatMul"} <= {e["op_type"] for e in text["effects"]}
    assert json.loads((tmp_path / "auto" / "export.json").read_text())["precision"] == (
        f"int8 (image none, text static; {len(text['excluded'])} text nodes fp32)"
    )
    # in QDQ a quantized node reads every input through a DequantizeLinear; a node kept fp32 reads at least
    # one as it is (a matmul its weight, the mask's Add the mask, a Softmax the Add before it). Which nodes
    # auto keeps depends on the CPU's int8 kernels (a MatMul among the Adds and Softmaxes, or not)
    graph = onnx.load(str(tmp_path / "auto" / "text_encoder.onnx")).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    nodes = {n.name: n for n in graph.node}
    assert all(
        any(producer.get(i) != "DequantizeLinear" for i in nodes[name].input if i)
        for name in text["excluded"]
    )
    # the other matmuls read int8 weights through a Dequantize (only matmuls: the untrained tower's equal
    # layer-norm scales are one initializer the exporter shares)
    weights = {i.name for i in graph.initializer}
    dequantized = {
        n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights
    }
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    int8_weights = {n.name for n in matmuls if dequantized & set(n.input)}
    assert int8_weights and not int8_weights & set(text["excluded"])
    # held out: token sequences the selection never saw, from the same distribution
    tokens = random_tokens(tokenizer, 32, seed=3)
    fp32, auto = OrtDualEncoder(exports / "fp32"), OrtDualEncoder(tmp_path / "auto")
    assert F.cosine_similarity(fp32.encode_text(tokens), auto.encode_text(tokens)).mean() >= 0.99
    # an explicit list: a name neither graph holds is refused, by name; a listed one stays fp32
    with pytest.raises(ValueError, match="no node named \\['nope'\\]"):
        quantize_export(exports / "fp32", tmp_path / "bad", [], calibration, "none", "dynamic", ["nope"])
    kept = text["effects"][0]["node"]
    quantize_export(exports / "fp32", tmp_path / "listed", [], calibration, "none", "static", [kept])
    assert read_quantization(tmp_path / "listed")["text"]["excluded"] == [kept]


def test_export_is_refused_when_it_is_not_one(tmp_path):
    (tmp_path / "image_encoder.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="TorchScript export of format 1"):
        load_exported(tmp_path)


ISOLATED = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer
    path, inputs = sys.argv[1], np.load(sys.argv[2])
    image = ort.InferenceSession(path + "/image_encoder.onnx", providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(path + "/text_encoder.onnx", providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(path + "/tokenizer.json")
    captions = json.loads(sys.argv[3])
    out = {}
    for n in (1, 7):
        tokens = np.array([e.ids for e in tokenizer.encode_batch(captions[:n])], dtype=np.int64)
        out[f"tokens{n}"] = tokens
        out[f"text{n}"] = text.run(None, {"tokens": tokens})[0]
        out[f"image{n}"] = image.run(None, {"images": inputs["images"][:n]})[0]
    imported = [m for m in sys.modules if m.split(".")[0] in ("torch", "autoglm_train")]
    assert not imported, f"imported {imported[:5]}"
    np.savez(sys.argv[4], **out)
    """
)


def test_onnx_export_serves_in_an_isolated_process_without_torch_or_our_code(
    model, tokenizer, exports, tmp_path
):
    images = batch(tokenizer, 7, seed=9)[0]
    captions = ["a small red circle at the top left", "a large blue circle", "red", "x", "a", "b c", "circle"]
    np.savez(tmp_path / "in.npz", images=images.numpy())
    (tmp_path / "serve.py").write_text(ISOLATED)
    # -I: isolated, so neither the working directory nor PYTHONPATH can slip our package in
    args = [str(tmp_path / "serve.py"), str(exports / "fp32"), str(tmp_path / "in.npz"), json.dumps(captions)]
    done = subprocess.run(
        [sys.executable, "-I", *args, str(tmp_path / "out.npz")], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = np.load(tmp_path / "out.npz")
    with torch.no_grad():
        for n in (1, 7):
            assert torch.equal(torch.from_numpy(out[f"tokens{n}"]), tokenizer(captions[:n]))
            image, text = model.encode_image(images[:n]), model.encode_text(tokenizer(captions[:n]))
            torch.testing.assert_close(torch.from_numpy(out[f"image{n}"]), image, atol=1e-4, rtol=0)
            torch.testing.assert_close(torch.from_numpy(out[f"text{n}"]), text, atol=1e-4, rtol=0)
    meta = json.loads((exports / "fp32" / "export.json").read_text())
    assert meta["preprocess"] == PREPROCESS and meta["embed_dim"] == 32 and meta["format"] == 2


def test_embed_writes_a_faiss_index_and_answers_text_queries(
    model, tokenizer, exports, shapes_dir, tmp_path, capsys
):
    shards = str(shapes_set(shapes_dir) / "val-*.tar")
    common = ["--model", str(exports / "fp32"), "--no-progress"]
    code = embed_main(
        [*common, "--shards", shards, "--out", str(tmp_path / "index"), "--query", "a red circle"]
    )
    assert code == 0
    # no pickle: faiss's own format and JSON
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["index.faiss", "index.json"]
    index = load_index(tmp_path / "index")
    assert index["index"].ntotal == len(index["ids"]) == len(index["captions"]) == 250  # 200 + 50 binding
    assert index["kind"] == "flat" and "recall_at_10_vs_exact" not in index
    printed = capsys.readouterr().out
    assert "250 image embeddings" in printed and "'a red circle':" in printed and "  5. " in printed
    # the exact index ranks as a brute-force cosine ranking of the model's own embeddings does
    stored = index["index"].reconstruct_n(0, 250)
    exported = load_exported(exports / "fp32")
    query_vector = exported.encode_text(["a red circle"])[0]
    best = np.argsort(-(stored @ query_vector), kind="stable")[:3]
    hits = query(exported, index, "a red circle", k=3)
    assert [h[1] for h in hits] == [index["ids"][i] for i in best]
    # querying the saved index answers as the fresh one did
    assert embed_main([*common, "--index", str(tmp_path / "index"), "--query", "a red circle"]) == 0
    assert capsys.readouterr().out.split("'a red circle':")[1] == printed.split("'a red circle':")[1]
    # --update against the same shards embeds nothing; the int8 export of the same model is another model
    update = ["--shards", shards, "--index", str(tmp_path / "index"), "--update"]
    assert embed_main([*common, *update]) == 0
    assert "0 added, 0 changed, 0 removed, 250 unchanged" in capsys.readouterr().out
    assert embed_main(["--model", str(exports / "int8"), "--no-progress", *update]) == 2
    assert f"built with the export {exports / 'fp32'}" in capsys.readouterr().err
    # an approximate index reports its recall against exact search
    assert (
        embed_main([*common, "--shards", shards, "--out", str(tmp_path / "hnsw"), "--index-type", "hnsw"])
        == 0
    )
    assert "recall@10 against exact" in capsys.readouterr().out
    assert 0 < load_index(tmp_path / "hnsw")["recall_at_10_vs_exact"] <= 1
    # an index of an old format (a torch pickle) is not unpickled; a set too small for ivfpq is an error
    torch.save({"image": torch.zeros(2, 2)}, tmp_path / "old.pt")
    assert embed_main([*common, "--index", str(tmp_path / "old.pt"), "--query", "x"]) == 2
    assert "no longer read" in capsys.readouterr().err
    assert (
        embed_main([*common, "--shards", shards, "--out", str(tmp_path / "pq"), "--index-type", "ivfpq"]) == 2
    )
    assert "at least 256 vectors" in capsys.readouterr().err
    assert embed_main([*common, "--shards", str(tmp_path / "no-*.tar"), "--out", str(tmp_path / "x")]) == 2


def test_embed_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        embed_main(["--help"])
    text = capsys.readouterr().out
    for option in embed_parser()._actions:
        assert option.help, f"{option.option_strings} has no help"
        assert option.option_strings[0] in text


@pytest.mark.slow
def test_compression_job_on_a_trained_checkpoint_writes_the_report(shapes_dir, tmp_path):
    env = {**os.environ, "AUTOGLM_DATA_DIR": str(shapes_dir), "PYTHONUNBUFFERED": "1"}
    train_dir, job_dir = tmp_path / "train", tmp_path / "compress"
    trained = subprocess.run(
        [
            sys.executable,
            "-m",
            "autoglm_train",
            *TINY,
            "logger=none",
            "eval.zeroshot.task=null",
            f"hydra.run.dir={train_dir}",
        ],
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
        "ORT fp32",
        "ORT int8",
        "pruned + distilled + ORT fp32",
        "pruned + distilled + ORT int8",
    ]
    # TINY's heads: 256 (resnet18_narrow) -> 64 and 64 -> 64, factorized at rank 8
    saved = (256 * 64 + 64 * 64) - 8 * (256 + 64 + 64 + 64)
    assert rows["original"]["params"] - rows[lowrank]["params"] == saved
    assert rows["pruned"]["params"] < rows["original"]["params"]
    assert rows["pruned"]["flops"] < rows["original"]["flops"]
    assert rows["ORT int8"]["file_bytes"] < rows["ORT fp32"]["file_bytes"] / 2
    # the same weights on ONNX Runtime retrieve as in PyTorch; int8 within 2 points of fp32
    assert abs(rows["ORT fp32"]["val/r1_mean"] - rows["original"]["val/r1_mean"]) < 1e-3
    assert abs(rows["ORT int8"]["val/r1_mean"] - rows["ORT fp32"]["val/r1_mean"]) <= 0.02
    for row in rows.values():
        assert row["latency_s"] > 0 and row["throughput_b1"] > 0 and 0 <= row["val/r1_mean"] <= 1
    for name in ("original", "original_int8", "pruned_distilled", "pruned_distilled_int8"):
        assert (job_dir / "exports" / name / "export.json").is_file()
    assert (job_dir / "report.md").read_text().count("\n|") >= 8
    assert (job_dir / "pruning_sweep.png").stat().st_size > 1000
    assert report["sweep"][0]["ratio"] == 0.3


def test_compress_help_shows_this_jobs_keys():
    done = subprocess.run(
        [sys.executable, "-m", "autoglm_train.compress", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ckpt=PATH" in done.stdout and "powered by Hydra" not in done.stdout
    for key in ("prune.ratio", "finetune.steps", "quantize.image", "report.latency_batch", "lowrank_heads"):
        assert key in done.stdout
    # the defaults are this job's, not the training groups
    assert "calibration_batches: 32" in done.stdout and "experiment:" not in done.stdout
