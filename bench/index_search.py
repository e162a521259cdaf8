"""Vector search for the embed tool, side by side in one process: exact faiss (``IndexFlatIP``) against a
torch matmul + top-k (what ``embed`` did before) and the approximate indexes (HNSW, IVF-PQ), on the same
unit vectors and queries: build seconds, queries/s and recall@10 against the exact top-10.

    python bench/index_search.py [--n 200000] [--dim 256] [--queries 1000] [--data random|clustered]
                                 [--threads 2] [--no-write]

``random``: i.i.d. Gaussian directions, the issue's setting and the hardest case for approximate search
(no structure to exploit). ``clustered``: vectors around 1,000 centres, closer to real embeddings. Queries
come from the same distribution as the data and are not in it. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loss_comparison import RESULTS, replace_section  # noqa: E402

from autoglm_train import vector_index  # noqa: E402

K = 10


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(kind: str, n: int, queries: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return unit(rng.standard_normal((n, dim))), unit(rng.standard_normal((queries, dim)))
    centres = unit(rng.standard_normal((1000, dim)))

    def around(m):
        return unit(centres[rng.integers(0, len(centres), m)] + 0.35 * unit(rng.standard_normal((m, dim))))

    return around(n), around(queries)


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls (after one warm-up) and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000, help="vectors in the index")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--data", choices=("random", "clustered"), default="random")
    parser.add_argument("--threads", type=int, default=2, help="faiss and torch threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per method (median)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/results.md alone")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    data, queries = make_data(args.data, args.n, args.queries, args.dim)

    built = {}
    for kind in vector_index.KINDS:
        start = time.perf_counter()
        built[kind] = vector_index.build_index(data, kind)
        built[kind] = (built[kind], time.perf_counter() - start)
    data_t, queries_t = torch.from_numpy(data), torch.from_numpy(queries)
    methods = {
        "faiss flat (exact)": lambda: vector_index.search(built["flat"][0], queries, K)[1],
        "torch matmul + topk (exact)": lambda: (queries_t @ data_t.T).topk(K, dim=1).indices.numpy(),
        "faiss hnsw (M 32, efSearch 64)": lambda: vector_index.search(built["hnsw"][0], queries, K)[1],
        "faiss ivfpq": lambda: vector_index.search(built["ivfpq"][0], queries, K)[1],
    }
    build_s = {
        "faiss flat (exact)": built["flat"][1],
        "torch matmul + topk (exact)": 0.0,
        "faiss hnsw (M 32, efSearch 64)": built["hnsw"][1],
        "faiss ivfpq": built["ivfpq"][1],
    }
    ivf = faiss.downcast_index(built["ivfpq"][0])
    ivf_label = f"faiss ivfpq (nlist {ivf.nlist}, {ivf.pq.M} B/vector, nprobe {ivf.nprobe})"
    truth = None
    rows = []
    for name, fn in methods.items():
        seconds, found = timed(fn, args.repeats)
        truth = found if truth is None else truth  # the first method is exact search
        rows.append(
            {
                "method": ivf_label if name == "faiss ivfpq" else name,
                "build_s": round(build_s[name], 2),
                "queries_per_s": round(args.queries / seconds, 1),
                "recall_at_10": round(vector_index.recall_at_k(found, truth), 4),
            }
        )
        print(
            f"{rows[-1]['method']}: {rows[-1]['queries_per_s']:.0f} q/s, recall@10 {rows[-1]['recall_at_10']}"
        )
    base = rows[1]["queries_per_s"]  # the torch matmul, what embed did before
    for row in rows:
        row["vs_torch_matmul"] = round(row["queries_per_s"] / base, 2)
    result = {"bench": "index_search", **vars(args), "rows": rows}
    if not args.no_write:
        write_results(result)
    print(json.dumps(result))


def write_results(result: dict) -> None:
    lines = [
        f"| {r['method']} | {r['build_s']} | {r['queries_per_s']:,.0f} | {r['vs_torch_matmul']:.2f}x "
        f"| {r['recall_at_10']:.4f} |"
        for r in result["rows"]
    ]
    body = (
        f"### {result['data']} vectors\n\n"
        f"`python bench/index_search.py --data {result['data']}`: {result['n']:,} unit vectors of "
        f"{result['dim']} dimensions, {result['queries']:,} queries (batched), {result['threads']} threads, "
        "median of 3 rounds after a warm-up; recall@10 against the exact top-10.\n\n"
        "| method | build s | queries/s | vs torch matmul | recall@10 |\n|---|---|---|---|---|\n"
        + "\n".join(lines)
        + "\n"
    )
    RESULTS.write_text(replace_section(RESULTS.read_text(), f"index_search_{result['data']}", body))


if __name__ == "__main__":
    main()
