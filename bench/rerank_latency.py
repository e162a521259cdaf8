"""What re-ranking adds to a query served on ONNX Runtime: the default job's model with a 2-layer fusion stage
exported, the embedded set's held-out images indexed (exact faiss index + token grids), and one text query
timed without re-ranking and with its top k = 16 and 128 re-ranked by the fusion stage, interleaved,
median over the queries. Latency does not depend on the weights: the model is freshly initialised.

    python bench/rerank_latency.py [--queries 50] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402

from autoglm_train.compress.export import export_model  # noqa: E402
from autoglm_train.compress.serving import load_exported  # noqa: E402
from autoglm_train.data.shapes import write_shapes_shards  # noqa: E402
from autoglm_train.data.shards import iter_captions  # noqa: E402
from autoglm_train.data.tokenizer import train_bpe  # noqa: E402
from autoglm_train.embed import embed_shards, index_embeddings, query  # noqa: E402
from autoglm_train.model.dual_encoder import DualEncoder  # noqa: E402
from autoglm_train.model.towers import ImageTower, TextTower  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PREPROCESS = {
    "input_size": [3, 64, 64],
    "interpolation": "bicubic",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "crop_pct": 1.0,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 128])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shards = write_shapes_shards(ROOT / "data" / "shapes")  # the default job's set (made once)
    captions = list(iter_captions(shards["val"]))
    tokenizer = train_bpe(iter_captions(shards["train"], limit=20000), 1000, 32)
    model = DualEncoder(
        ImageTower("resnet18_narrow"), TextTower(tokenizer.vocab_size, 128, 2, 4, 32), fusion={"layers": 2}
    ).eval()
    work = Path(tempfile.mkdtemp(prefix="rerank_latency_"))
    path = export_model(model, tokenizer, work / "export", PREPROCESS, torch.randn(2, 3, 64, 64))
    exported = load_exported(path, args.threads)
    index = index_embeddings(embed_shards(path, shards["val"], progress=False, threads=args.threads))
    times: dict[int, list[float]] = {k: [] for k in [0, *args.ks]}
    for i in range(args.queries + 3):
        text = captions[i % len(captions)]
        for k in times:  # interleaved: each query at every k in turn
            start = time.perf_counter()
            query(exported, index, text, k=10, rerank=k)
            if i >= 3:  # warm-up
                times[k].append(1000 * (time.perf_counter() - start))
    ms = {k: statistics.median(v) for k, v in times.items()}
    print(
        json.dumps(
            {
                "bench": "rerank_latency",
                "images": len(index["ids"]),
                "threads": args.threads,
                "ms_per_query": {str(k): round(v, 2) for k, v in ms.items()},
                "added_ms": {str(k): round(ms[k] - ms[0], 2) for k in args.ks},
            }
        )
    )


if __name__ == "__main__":
    main()
