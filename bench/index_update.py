"""``embed --update`` against a full re-embed + rebuild, side by side in one process, on real shards and a
real exported model: the embedded set's generator writes ``--n`` (100,000) training images at the
default job's 64 px, the default job's model (``model=narrow``: ResNet-18 at half width, a 2-layer
128-wide text tower, 256-d embeddings; freshly initialised: the time does not depend on the weights) is
exported to ONNX, and ``--changed-share`` (1 %) of the samples change: half of those get a new image and
captions, a quarter are deleted, a quarter are new (a new shard).

    python bench/index_update.py [--n 100000] [--changed-share 0.01] [--kinds flat hnsw ivfpq]
                                 [--threads 2] [--faiss-threads 1] [--no-write]

Measured, each once (a full re-embed takes minutes; no rounds):

* full: ``embed_shards`` of the whole set before the change (read, decode, preprocess, ONNX Runtime),
  then per index kind ``index_embeddings`` + ``save_index``. The embedding pass is timed once and shared
  by the kinds, so a kind's full time is that pass plus its own index build and write, each measured.
  It runs on the set before the change: the same number of samples as after it (as many added as
  deleted), and the index the update starts from.
* update: per kind, on a copy of that index: ``load_index`` + ``update_index`` (every sample of the
  changed set read and digested; new and changed ones decoded and embedded; removals, additions, for
  hnsw the re-measured recall) + ``save_index``.

``ratio`` (the last line's) = flat's full time / flat's update time. Recall: the updated index against
one rebuilt from the same vectors (the updated flat index's, which are what a re-embed gives), both
against exact search, on the held-out images' embeddings as queries. faiss runs ``--faiss-threads`` (1:
on a shared 2-core machine OpenMP's spinning threads made an HNSW build 30x slower with 2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from loss_comparison import RESULTS, replace_section  # noqa: E402

from autoglm_train import vector_index  # noqa: E402
from autoglm_train.compress.export import export_model  # noqa: E402
from autoglm_train.data.shapes import generate, write_shapes_shards  # noqa: E402
from autoglm_train.data.shards import SkipCounter, iter_captions, raw_samples  # noqa: E402
from autoglm_train.data.tokenizer import train_bpe  # noqa: E402
from autoglm_train.embed import (  # noqa: E402
    embed_shards,
    index_embeddings,
    load_index,
    rows_of,
    save_index,
    update_index,
)
from autoglm_train.model.dual_encoder import DualEncoder  # noqa: E402
from autoglm_train.model.towers import ImageTower, TextTower  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PREPROCESS = {  # the default job's (timm's ImageNet defaults at 64 px)
    "input_size": [3, 64, 64],
    "interpolation": "bicubic",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "crop_pct": 1.0,
}


def write_changed(urls: list[str], out: Path, share: float, n: int, seed: int = 0) -> tuple[list[str], dict]:
    """The shards at ``urls`` rewritten into ``out`` with ``share`` of their ``n`` samples changed: half
    given another scene's image and captions, a quarter deleted, a quarter new (in a shard of their own)."""
    total = round(share * n)
    n_changed, n_removed = total // 2, total // 4
    n_added = total - n_changed - n_removed
    rng = random.Random(seed)
    picked = rng.sample(range(n), n_changed + n_removed)
    changed, removed = set(picked[:n_changed]), set(picked[n_changed:])
    scenes = generate(n_changed + n_added, 1, "extra", False, PREPROCESS["input_size"][1])
    out.mkdir(parents=True)
    written, position = [], 0
    for url in urls:
        path = out / Path(url).name
        with wds.TarWriter(str(path)) as sink:
            for sample in raw_samples([url], SkipCounter()):
                sample = {k: v for k, v in sample.items() if k != "__url__"}
                if position in changed:
                    scene = next(scenes)
                    sample.update(png=scene["png"], json=scene["json"])
                if position not in removed:
                    sink.write(sample)
                position += 1
        written.append(str(path))
    path = out / "extra-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for scene in scenes:
            sink.write(scene)
    counts = {"changed": n_changed, "removed": n_removed, "added": n_added}
    return [*written, str(path)], counts


def export(work: Path, shards: dict) -> Path:
    tokenizer = train_bpe(iter_captions(shards["train"], limit=20000), 1000, 32)
    torch.manual_seed(0)
    model = DualEncoder(ImageTower("resnet18_narrow"), TextTower(tokenizer.vocab_size, 128, 2, 4, 32), 256)
    return export_model(model.eval(), tokenizer, work / "export", PREPROCESS, torch.randn(2, 3, 64, 64))


def machine() -> str:
    """The CPU's model, its widest x86 vector extension and its cores (as os.cpu_count sees them)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), ""
    )
    flags = set(
        next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    )
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine()
    return f"{model or platform.processor() or platform.machine()} ({isa}), {os.cpu_count()} cores"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def keys(index: dict, found: np.ndarray) -> np.ndarray:
    ids = np.asarray(index["ids"], dtype=object)
    return ids[rows_of(index, found.reshape(-1))].reshape(found.shape)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(found, exact, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="samples in the set")
    parser.add_argument("--changed-share", type=float, default=0.01, help="share of the samples changed")
    parser.add_argument("--kinds", nargs="+", choices=vector_index.KINDS, default=list(vector_index.KINDS))
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime (and torch) threads")
    parser.add_argument("--faiss-threads", type=int, default=1, help="faiss's OpenMP threads")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/results.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.faiss_threads)

    def say(text: str) -> None:
        print(text, flush=True)

    seconds, shards = timed(lambda: write_shapes_shards(ROOT / "data" / "shapes", n_train=args.n))
    say(f"set: {args.n:,} training images at 64 px ({len(shards['train'])} shards; {seconds:.0f} s, cached)")
    work = Path(tempfile.mkdtemp(prefix="index_update_"))
    try:
        model = export(work, shards)
        after, changes = write_changed(shards["train"], work / "after", args.changed_share, args.n)
        say(f"changed set: {changes}")
        queries = embed_shards(model, shards["val"], progress=False, threads=args.threads)["image"]

        embed_s, embedded = timed(
            lambda: embed_shards(model, shards["train"], progress=False, threads=args.threads)
        )
        say(f"full embedding pass: {embed_s:.1f} s ({len(embedded['ids']) / embed_s:.0f} images/s)")
        rows = []
        for kind in args.kinds:
            full_dir, updated_dir = work / f"full-{kind}", work / f"updated-{kind}"
            build_s, built = timed(lambda kind=kind: index_embeddings(embedded, kind))
            save_s, _ = timed(lambda built=built, full_dir=full_dir: save_index(built, full_dir))
            del built
            shutil.copytree(full_dir, updated_dir)
            load_s, index = timed(lambda updated_dir=updated_dir: load_index(updated_dir))
            update_s, (index, counts) = timed(
                lambda index=index: update_index(index, model, after, progress=False, threads=args.threads)
            )
            usave_s, _ = timed(lambda index=index, updated_dir=updated_dir: save_index(index, updated_dir))
            full = embed_s + build_s + save_s
            update = load_s + update_s + usave_s
            row = {
                "kind": kind,
                "full_s": round(full, 2),
                "full_embed_s": round(embed_s, 2),
                "full_index_s": round(build_s, 2),
                "full_save_s": round(save_s, 2),
                "update_s": round(update, 2),
                "update_load_s": round(load_s, 2),
                "update_scan_embed_index_s": round(update_s, 2),
                "update_save_s": round(usave_s, 2),
                "ratio": round(full / update, 1),
                **{k: counts[k] for k in ("added", "changed", "removed", "unchanged", "hidden", "rebuilt")},
                "_index": index,
            }
            rows.append(row)
            say(
                f"{kind}: full {full:.1f} s (embed {embed_s:.1f} + index {build_s:.1f} + save {save_s:.1f}); "
                f"update {update:.1f} s (load {load_s:.1f} + update {update_s:.1f} + save {usave_s:.1f}); "
                f"{row['ratio']}x; {counts}"
            )
        embedded = None  # its 100k vectors: memory for the recall check
        check_recall(rows, queries, say)
        for row in rows:
            del row["_index"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    flat = next((r for r in rows if r["kind"] == "flat"), rows[0])
    result = {
        "bench": "index_update",
        "n": args.n,
        "changed_share": args.changed_share,
        "changes": changes,
        "threads": args.threads,
        "faiss_threads": args.faiss_threads,
        "cpu": machine(),
        "rows": rows,
        "ratio": flat["ratio"],
    }
    if not args.no_write:
        write_results(result)
    print(json.dumps(result))


def check_recall(rows: list[dict], queries: np.ndarray, say) -> None:
    """Each approximate updated index against one rebuilt from the changed set's vectors (read back from
    the updated flat index, or the hnsw one's live vectors), recall@10 against exact search."""
    by_kind = {r["kind"]: r["_index"] for r in rows}
    source = by_kind.get("flat") or by_kind.get("hnsw")
    if source is None:
        return
    ids, vectors = vector_index.stored_vectors(source["index"])
    live = ~np.isin(ids, source["hidden_ids"])
    ids, vectors = ids[live], vectors[live]
    exact = vector_index.build_index(vectors, "flat", ids=ids)
    truth = keys(source, vector_index.search(exact, queries, 10)[1])
    for row in rows:
        if row["kind"] == "flat":
            found = keys(source, vector_index.search(source["index"], queries, 10)[1])
            row["recall_updated"] = row["recall_rebuilt"] = recall(found, truth)
            continue
        updated = row["_index"]
        rebuilt = vector_index.build_index(vectors, row["kind"], ids=ids)
        got = vector_index.search(updated["index"], queries, 10, updated["hidden_ids"])[1]
        want = vector_index.search(rebuilt, queries, 10)[1]
        row["recall_updated"] = round(recall(keys(updated, got), truth), 4)
        row["recall_rebuilt"] = round(recall(keys(source, want), truth), 4)
        say(
            f"{row['kind']}: recall@10 against exact, updated {row['recall_updated']:.4f}, rebuilt from the "
            f"same vectors {row['recall_rebuilt']:.4f} "
            f"({row['recall_updated'] / max(row['recall_rebuilt'], 1e-9):.4f} of it)"
        )


def write_results(result: dict) -> None:
    lines = [
        f"| {r['kind']} | {r['full_s']:.1f} ({r['full_embed_s']:.1f} + {r['full_index_s']:.1f} + "
        f"{r['full_save_s']:.1f}) | {r['update_s']:.1f} ({r['update_load_s']:.1f} + "
        f"{r['update_scan_embed_index_s']:.1f} + {r['update_save_s']:.1f}) | {r['ratio']:.1f}x | "
        f"{r['added']} / {r['changed']} / {r['removed']} / {r['unchanged']:,} | "
        f"{r.get('recall_updated', float('nan')):.4f} / {r.get('recall_rebuilt', float('nan')):.4f} |"
        for r in result["rows"]
    ]
    body = (
        f"`python bench/index_update.py`: {result['n']:,} embedded-set images at 64 px, "
        f"{result['changed_share']:.0%} of them changed ({result['changes']}), the default job's model "
        f"(freshly initialised) on ONNX Runtime with {result['threads']} threads, faiss with "
        f"{result['faiss_threads']}, on {result['cpu']}; one run each (full: embedding pass shared by the "
        "kinds + that kind's build + write; update: load + update + write). Recall@10 against exact "
        "search on the 1,250 held-out images' embeddings: updated index / one rebuilt from the same "
        "vectors.\n\n"
        "| index | full s (embed + index + write) | update s (load + update + write) | speed-up | "
        "added / changed / removed / unchanged | recall@10 updated / rebuilt |\n|---|---|---|---|---|---|\n"
        + "\n".join(lines)
        + "\n"
    )
    RESULTS.write_text(replace_section(RESULTS.read_text(), "index_update", body))


if __name__ == "__main__":
    main()
