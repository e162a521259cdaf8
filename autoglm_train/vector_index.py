"""Nearest-neighbour search over unit embeddings with faiss (inner product = cosine).

    flat     exact: every vector scored (``IndexFlatIP``); the default
    hnsw     approximate: a navigable small-world graph over the full vectors (``IndexHNSWFlat``); no
             training, fast queries, the index is larger than the vectors
    ivfpq    approximate: vectors bucketed around ``nlist`` centroids and product-quantized to
             ``pq_m`` bytes each; ``nprobe`` buckets are scanned per query. Small, needs training data
             (about 39 vectors per centroid)

An approximate index is only worth its recall: ``recall_at_k`` measures it against exact search.

Every index holds each vector under an int64 id of the caller's (``ids``; 0..N-1 unless given), which is
what ``search`` returns, so vectors can be added and removed without renumbering the rest: flat and hnsw
through ``IndexIDMap2`` (which keeps id -> vector, so stored vectors can be read back), ivfpq through its
own ids. An HNSW graph cannot lose a vector: ``remove`` refuses it, and the caller hides removed ids at
search time instead (``search(..., hidden=ids)``, an ``IDSelector``) until it rebuilds the graph.
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


def _as_ids(ids, n: int | None = None) -> np.ndarray:
    out = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
    if n is not None and len(out) != n:
        raise ValueError(f"{len(out)} ids for {n} vectors")
    return out


def build_index(
    vectors,
    kind: str = "flat",
    hnsw_m: int = 32,
    ef_search: int = 64,
    nprobe: int = 16,
    seed: int = 0,
    ids=None,
) -> faiss.Index:
    """An index of ``vectors`` ``(N, D)`` (unit rows: scores are cosines) under ``ids`` (int64, unique;
    default ``0..N-1``)."""
    if kind not in KINDS:
        raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
    x = _as_float32(vectors)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"expected a non-empty (N, D) array of vectors, got shape {x.shape}")
    ids = np.arange(len(x), dtype=np.int64) if ids is None else _as_ids(ids, len(x))
    dim = x.shape[1]
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif kind == "hnsw":
        graph = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efSearch = ef_search
        index = faiss.IndexIDMap2(graph)
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
    index.add_with_ids(x, ids)
    return index


def add(index: faiss.Index, vectors, ids) -> None:
    """``vectors`` added under ``ids`` (new ones: faiss does not check)."""
    x = _as_float32(vectors)
    if len(x):
        index.add_with_ids(x, _as_ids(ids, len(x)))


def can_remove(index: faiss.Index) -> bool:
    return kind_of(index) != "hnsw"


def remove(index: faiss.Index, ids) -> int:
    """Removes the vectors of ``ids``; returns how many there were. An HNSW graph cannot: ValueError."""
    if not can_remove(index):
        raise ValueError("an hnsw index cannot remove vectors: hide their ids at search time, or rebuild")
    ids = _as_ids(ids)
    return int(index.remove_ids(ids)) if len(ids) else 0


def stored_vectors(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, vectors)`` of everything a flat or hnsw index holds, hidden ids included (ivfpq keeps
    only compressed codes: ValueError)."""
    if kind_of(index) == "ivfpq":
        raise ValueError("an ivfpq index keeps product-quantized codes, not its vectors")
    index = faiss.downcast_index(index)
    inner = faiss.downcast_index(index.index)
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    return ids, inner.reconstruct_n(0, inner.ntotal) if inner.ntotal else np.zeros((0, inner.d), np.float32)


def search(index: faiss.Index, queries, k: int, hidden=None) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)``, each ``(Q, min(k, N))``, best first; ``-1`` pads a row with fewer results.
    ``hidden``: ids never returned (an hnsw index's removed vectors)."""
    q = _as_float32(queries)
    if q.ndim == 1:
        q = q[None]
    k = min(k, index.ntotal)
    hidden = None if hidden is None else _as_ids(hidden)
    if hidden is None or len(hidden) == 0:
        return index.search(q, k)
    if kind_of(index) != "hnsw":
        raise ValueError("hidden ids are for an hnsw index; remove() the vectors from the others")
    graph = faiss.downcast_index(faiss.downcast_index(index).index)
    # over the ids we gave (IDMap2 translates); each object named, so Python keeps it alive through the call
    batch = faiss.IDSelectorBatch(hidden)
    selector = faiss.IDSelectorNot(batch)
    params = faiss.SearchParametersHNSW(sel=selector, efSearch=graph.hnsw.efSearch)
    return index.search(q, k, params=params)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k that the approximate top-k also holds."""
    k = exact.shape[1]
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(found, exact, strict=True))
    return hits / (k * len(exact))


def kind_of(index: faiss.Index) -> str:
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap2 | faiss.IndexIDMap):
        index = faiss.downcast_index(index.index)
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
