"""Nearest-neighbour search over unit embeddings with faiss (inner product = cosine).

    flat     exact: every vector scored (``IndexFlatIP``); the default
    hnsw     approximate: a navigable small-world graph over the full vectors (``IndexHNSWFlat``); no
             training, fast queries, the index is larger than the vectors
    ivfpq    approximate: vectors bucketed around ``nlist`` centroids and product-quantized to
             ``pq_m`` bytes each; ``nprobe`` buckets are scanned per query. Small, needs training data
             (about 39 vectors per centroid)

An approximate index is only worth its recall: ``recall_at_k`` measures it against exact search.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

KINDS = ("flat", "hnsw", "ivfpq")
PQ_CENTROIDS = 256  # per sub-quantizer, at 8 bits per code


def _as_float32(vectors) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))


def ivf_lists(n: int) -> int:
    """Centroids for ``n`` vectors: about 4 sqrt(n) (faiss's guideline), but at least 39 training
    vectors per centroid, which small sets cannot give many of."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def pq_bytes(dim: int) -> int:
    """Sub-quantizers (bytes per vector at 8 bits each): a quarter of the dimensions, dividing it."""
    m = max(1, dim // 4)
    while dim % m:
        m -= 1
    return m


def build_index(
    vectors, kind: str = "flat", hnsw_m: int = 32, ef_search: int = 64, nprobe: int = 16, seed: int = 0
) -> faiss.Index:
    """An index of ``vectors`` ``(N, D)`` (unit rows: scores are cosines)."""
    if kind not in KINDS:
        raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
    x = _as_float32(vectors)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"expected a non-empty (N, D) array of vectors, got shape {x.shape}")
    dim = x.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    else:
        if len(x) < PQ_CENTROIDS:
            raise ValueError(
                f"an ivfpq index needs at least {PQ_CENTROIDS} vectors to train its product-quantizer "
                f"codebooks, got {len(x)}: use flat (exact) or hnsw for a set this small"
            )
        nlist = ivf_lists(len(x))
        index = faiss.IndexIVFPQ(
            faiss.IndexFlatIP(dim), dim, nlist, pq_bytes(dim), 8, faiss.METRIC_INNER_PRODUCT
        )
        index.cp.seed = index.pq.cp.seed = seed
        # faiss wants 39 vectors per PQ centroid and warns once per sub-quantizer below that: the
        # recall measured against exact search is the honest word on a small set's codebooks
        index.pq.cp.min_points_per_centroid = 1
        index.train(x)
        index.nprobe = min(nprobe, nlist)
    index.add(x)
    return index


def search(index: faiss.Index, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, row indices)``, each ``(Q, min(k, N))``, best first."""
    q = _as_float32(queries)
    if q.ndim == 1:
        q = q[None]
    return index.search(q, min(k, index.ntotal))


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k that the approximate top-k also holds."""
    k = exact.shape[1]
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(found, exact, strict=True))
    return hits / (k * len(exact))


def kind_of(index: faiss.Index) -> str:
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexHNSWFlat):
        return "hnsw"
    if isinstance(index, faiss.IndexIVFPQ):
        return "ivfpq"
    return "flat"


def serialize(index: faiss.Index) -> bytes:
    """faiss's own binary format (no pickle), for an atomic write."""
    return faiss.serialize_index(index).tobytes()


def read_index(path) -> faiss.Index:
    return faiss.read_index(str(path))
