"""Embed a shard set with an exported model on ONNX Runtime, keep the embeddings in a faiss index, and
answer text -> image queries from it.

    python -m autoglm_train.embed --model EXPORT_DIR --shards 'data/shapes/<spec>/val-*.tar' --out index
    python -m autoglm_train.embed --model EXPORT_DIR --shards '...' --index index --update
    python -m autoglm_train.embed --model EXPORT_DIR --index index --query "a red circle" --k 5
    python -m autoglm_train.embed --model EXPORT_DIR --index index --query "..." --rerank 16

``--update`` brings an index up to date with the shards as they are now, in place (or into ``--out``):
each sample is known by its webdataset key and a digest of its image bytes and captions
(``data.shards.content_digest``), so only new and changed samples are decoded and embedded, and those gone
are dropped. Each vector sits in faiss under a stable int64 id (never reused): flat and ivfpq indexes
remove old ids; an hnsw graph cannot, so it hides them at search time until more than
``--rebuild-deleted-share`` (0.2) of it is hidden, then is rebuilt from its stored vectors. The index
records a digest of the export that built it (``export_digest``: its image graph and export.json), and
``--update`` with another export is refused.

``--rerank K`` (a model trained with a fusion stage, model.fusion.layers > 0): the index's top K images
for each query are re-scored by the exported fusion stage's image-text matching head and re-ordered
(``--rerank-score itm``: its match log-odds; ``itm+itc``: plus the scaled cosine), at K fusion passes a
query. An index built from such a model keeps each image's token grid for it (``image_tokens.npy``, rows
aligned with the sample lists; updates keep them so).

The model is an export of ``python -m autoglm_train.compress`` (ONNX graphs + tokenizer, fp32 or int8:
``<run>/exports/<variant>``). The index is a directory holding no pickle, so reading one handed over by
someone else runs no code: ``index.faiss`` (faiss's own format) and ``index.json`` (per sample: id, first
caption, content digest, shard, faiss id; the shards, model and its digest, skipped samples, the index
kind and build options, hnsw's hidden ids and, for an approximate one, its recall@10 against exact search
measured when it was built, or for hnsw when it was last updated). An update writes its faiss (and token)
files under new names and the JSON that names them last, so a stopped update leaves the old index whole.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from autoglm_train import vector_index
from autoglm_train.compress.serving import IMAGE_FILE, META_FILE, load_exported, read_meta
from autoglm_train.data.shards import SkipCounter, content_digest, decode, existing_shards, raw_samples
from autoglm_train.utils.files import atomic_write_bytes, atomic_write_json

INDEX_FORMAT = 3  # 1: embeddings.safetensors searched by brute force; 2: faiss rows, no ids or hashes
FAISS_FILE, INDEX_FILE, TOKENS_FILE = "index.faiss", "index.json", "image_tokens.npy"
RECALL_QUERIES = 1000  # stored vectors used as queries to measure an approximate index against exact search
REBUILD_DELETED_SHARE = 0.2  # hnsw: rebuild the graph once more than this share of its vectors is hidden
BUILD_OPTIONS = {"hnsw_m": 32, "ef_search": 64, "nprobe": 16}


def export_digest(model_dir: str | Path) -> str:
    """A digest of what an index's vectors depend on in an export: ``export.json`` and the image graph
    (with a fusion stage, its image-token graph too). Another export, an int8 one of the same model
    included, makes other vectors: an index remembers the digest of the one that built it."""
    path = Path(model_dir)
    meta = read_meta(path)
    names = [
        IMAGE_FILE,
        *([meta["fusion"]["files"]["image_tokens"]] if meta.get("fusion") else []),
        META_FILE,
    ]
    h = hashlib.blake2b(digest_size=16)
    for name in names:
        h.update(name.encode() + b"\0")
        with open(path / name, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def scan_shards(urls: list[str], skips: SkipCounter, known: dict[str, str] | None = None) -> Iterator[dict]:
    """Every sample of ``urls`` in shard order as ``{"id", "hash", "shard"}`` (its webdataset key, its
    ``content_digest``, its shard's index in ``urls``). One that ``known`` (id -> hash) holds with this
    hash comes as just that, undecoded; every other one is decoded too (``"image"``, ``"caption"``: its
    first) or, if unusable, skipped and counted in ``skips``. With ``known``, an id met twice is a
    ValueError: an update finds samples by id."""
    shard_of = {url: i for i, url in enumerate(urls)}
    seen: dict[str, str] = {}
    for sample in raw_samples(urls, skips):
        key, url = sample["__key__"], sample["__url__"]
        if known is not None:
            if key in seen:
                raise ValueError(
                    f"sample id {key!r} is in {seen[key]} and in {url}: --update finds samples by their "
                    "webdataset key, which must be unique across the shards (embed without --update)"
                )
            seen[key] = url
        record = {"id": key, "hash": content_digest(sample), "shard": shard_of[url]}
        if known is not None and known.get(key) == record["hash"]:
            yield record
            continue
        out = decode(sample, "captions", skips)
        if out is not None:
            yield {**record, "image": out["image"], "caption": out["captions"][0]}


def embed_scanned(
    exported, samples: Iterator[dict], batch_size: int = 128, progress: bool = True
) -> tuple[list[dict], list[dict], np.ndarray | None, np.ndarray | None]:
    """``scan_shards``' samples through the image encoder, those that carry an image in batches:
    ``(embedded samples (without the image), the others, their embeddings (N, D), token grids)``; the
    arrays are None when nothing was embedded, the grids also when the export has no fusion stage."""
    import timm.data
    import torch

    transform = timm.data.create_transform(**exported.meta["preprocess"], is_training=False)
    embedded, others, parts, grids, pending = [], [], [], [], []

    def flush():
        batch = torch.stack([transform(r.pop("image")) for r in pending]).numpy()
        parts.append(exported.encode_image(batch))
        if exported.has_fusion:  # each image's token grid, for re-ranking queries with the fusion stage
            grids.append(exported.image_tokens(batch))
        embedded.extend(pending)
        bar.update(len(pending))
        pending.clear()

    with tqdm(desc="embedding images", unit="img", disable=not progress) as bar:
        for record in samples:
            if "image" not in record:
                others.append(record)
                if len(others) % 1000 == 0:
                    bar.set_postfix(unchanged=len(others), refresh=False)
                continue
            pending.append(record)
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
        bar.set_postfix(unchanged=len(others), refresh=False)
    return (
        embedded,
        others,
        np.concatenate(parts) if parts else None,
        np.concatenate(grids) if grids else None,
    )


def embed_shards(
    model_dir: str | Path, shards, batch_size: int = 128, progress: bool = True, threads: int | None = None
) -> dict:
    """Image embeddings of every usable sample in ``shards``, in shard order: ``{"ids", "captions",
    "hashes", "shard_of", "image" (N, D) float32, "shards", "model", "model_digest", "skipped"}``."""
    exported = load_exported(model_dir, threads)
    urls = existing_shards(shards)
    skips = SkipCounter()
    embedded, _, vectors, grids = embed_scanned(exported, scan_shards(urls, skips), batch_size, progress)
    if vectors is None:
        raise ValueError(f"no usable image in {len(urls)} shard(s); skipped {skips.describe() or 'nothing'}")
    return {
        "ids": [r["id"] for r in embedded],
        "captions": [r["caption"] for r in embedded],
        "hashes": [r["hash"] for r in embedded],
        "shard_of": [r["shard"] for r in embedded],
        "image": vectors,
        **({"image_tokens": grids} if grids is not None else {}),
        "shards": urls,
        "model": str(model_dir),
        "model_digest": export_digest(model_dir),
        "skipped": dict(skips.counts),
    }


def measure_recall(index, ids: np.ndarray, vectors: np.ndarray, hidden=None, k: int = 10) -> float:
    """recall@k of ``index`` against exact search over ``vectors`` (under ``ids``), on up to
    ``RECALL_QUERIES`` of them as queries."""
    rows = np.random.default_rng(0).permutation(len(vectors))[:RECALL_QUERIES]
    exact = vector_index.build_index(vectors, "flat", ids=ids)
    _, truth = vector_index.search(exact, vectors[rows], k)
    _, found = vector_index.search(index, vectors[rows], k, hidden)
    return vector_index.recall_at_k(found, truth)


def index_embeddings(embedded: dict, kind: str = "flat", k: int = 10, **options) -> dict:
    """``embed_shards``' result with its faiss index (``"index"``) in place of the raw array, each vector
    under an id (``"vector_ids"``, aligned with ``"ids"``: 0..N-1 here, never reused by updates); for an
    approximate kind, its recall@k against exact search on up to ``RECALL_QUERIES`` stored vectors."""
    vectors = embedded["image"]
    options = {**BUILD_OPTIONS, **options}
    ids = np.arange(len(vectors), dtype=np.int64)
    index = vector_index.build_index(vectors, kind, ids=ids, **options)
    out = {k_: v for k_, v in embedded.items() if k_ != "image"}
    out["fusion_tokens"] = "image_tokens" in embedded
    out.update(
        index=index,
        kind=kind,
        dim=int(vectors.shape[1]),
        options=options,
        vector_ids=ids,
        next_vector_id=len(ids),
        hidden_ids=np.zeros(0, np.int64),
        generation=0,
    )
    if kind != "flat":
        out[f"recall_at_{k}_vs_exact"] = measure_recall(index, ids, vectors, k=k)
        out["recall_measured"] = "build"
    return out


def update_index(
    index: dict,
    model_dir: str | Path,
    shards,
    batch_size: int = 128,
    progress: bool = True,
    threads: int | None = None,
    rebuild_deleted_share: float = REBUILD_DELETED_SHARE,
) -> tuple[dict, dict]:
    """``index`` (``load_index``'s) brought up to date with ``shards``: only samples that are new or
    whose content changed (id + ``content_digest``) are embedded; those gone (or now unusable) and the old
    vectors of changed ones are removed (flat, ivfpq) or hidden at search time (hnsw, whose graph is
    rebuilt from its stored vectors once more than ``rebuild_deleted_share`` of it is hidden). Returns
    ``(the updated index, counts: added, changed, removed, unchanged, hidden, rebuilt)``; ``index``'s
    faiss index is changed in place. An index built by another export is refused (ValueError)."""
    digest = export_digest(model_dir)
    if index.get("model_digest") != digest:
        raise ValueError(
            f"--update: the index was built with the export {index.get('model')} (digest "
            f"{str(index.get('model_digest'))[:12]}), not {model_dir} (digest {digest[:12]}): another "
            "model's vectors do not mix with its own; embed again without --update, or update with that "
            "export"
        )
    old_ids = index["ids"]
    position = {key: i for i, key in enumerate(old_ids)}
    if len(position) != len(old_ids):
        raise ValueError("--update: the index holds a sample id twice; embed again without --update")
    known = dict(zip(old_ids, index["hashes"], strict=True))
    exported = load_exported(model_dir, threads)
    urls = existing_shards(shards)
    skips = SkipCounter()
    embedded, unchanged, vectors, grids = embed_scanned(
        exported, scan_shards(urls, skips, known), batch_size, progress
    )
    if not embedded and not unchanged:
        raise ValueError(f"no usable image in {len(urls)} shard(s); skipped {skips.describe() or 'nothing'}")
    kept = np.array(sorted(position[r["id"]] for r in unchanged), dtype=np.int64)
    new_shard = {r["id"]: r["shard"] for r in unchanged}
    changed = sum(r["id"] in known for r in embedded)
    gone = np.setdiff1d(np.arange(len(old_ids)), kept)  # removed and changed samples' old vectors
    old_vector_ids = np.asarray(index["vector_ids"], np.int64)
    new_ids = index["next_vector_id"] + np.arange(len(embedded), dtype=np.int64)

    faiss_index, hidden = index["index"], np.asarray(index.get("hidden_ids", []), np.int64)
    if vector_index.can_remove(faiss_index):
        vector_index.remove(faiss_index, old_vector_ids[gone])
    else:
        hidden = np.concatenate([hidden, old_vector_ids[gone]])
    if vectors is not None:
        vector_index.add(faiss_index, vectors, new_ids)
    rebuilt = False
    if len(hidden) and len(hidden) > rebuild_deleted_share * faiss_index.ntotal:
        stored_ids, stored = vector_index.stored_vectors(faiss_index)
        live = ~np.isin(stored_ids, hidden)
        options = index["options"]
        faiss_index = vector_index.build_index(
            stored[live], index["kind"], hnsw_m=options["hnsw_m"], ef_search=options["ef_search"],
            ids=stored_ids[live],
        )  # fmt: skip
        hidden, rebuilt = np.zeros(0, np.int64), True

    def merged(column: str, key: str):
        return [index[column][i] for i in kept] + [r[key] for r in embedded]

    out = {
        **index,
        "index": faiss_index,
        "ids": merged("ids", "id"),
        "captions": merged("captions", "caption"),
        "hashes": merged("hashes", "hash"),
        "shard_of": [new_shard[old_ids[i]] for i in kept] + [r["shard"] for r in embedded],
        "vector_ids": np.concatenate([old_vector_ids[kept], new_ids]),
        "next_vector_id": int(index["next_vector_id"] + len(embedded)),
        "hidden_ids": hidden,
        "shards": urls,
        "model": str(model_dir),
        "skipped": dict(skips.counts),
        "generation": int(index.get("generation", 0)) + 1,
    }
    if index.get("fusion_tokens"):
        parts = [index["image_tokens"][kept]] + ([grids] if grids is not None else [])
        out["image_tokens"] = np.concatenate(parts)
    if index["kind"] == "hnsw":  # its vectors are stored: measure again what the updates did to recall
        stored_ids, stored = vector_index.stored_vectors(faiss_index)
        live = ~np.isin(stored_ids, hidden)
        out["recall_at_10_vs_exact"] = measure_recall(faiss_index, stored_ids[live], stored[live], hidden)
        out["recall_measured"] = "update"
    counts = {
        "added": len(embedded) - changed,
        "changed": changed,
        "removed": len(gone) - changed,
        "unchanged": len(unchanged),
        "hidden": len(hidden),
        "rebuilt": rebuilt,
    }
    return out, counts


def _file_names(generation: int) -> dict[str, str]:
    """A fresh index's files keep the plain names; each update writes new ones, so the JSON (written
    last) names a complete set whenever a write stops, and the old set stays whole until it does."""
    if not generation:
        return {"faiss": FAISS_FILE, "tokens": TOKENS_FILE}
    return {"faiss": f"index.{generation}.faiss", "tokens": f"image_tokens.{generation}.npy"}


def save_index(index: dict, out: str | Path) -> None:
    """``index_embeddings``' (or ``update_index``'s) result as a directory: the faiss index first, then
    the JSON that describes it, so an index whose JSON exists is complete; files of an earlier
    generation are removed after."""
    out = Path(out)
    if out.is_file():
        raise ValueError(f"{out} is a file: an index is a directory ({FAISS_FILE} + {INDEX_FILE})")
    out.mkdir(parents=True, exist_ok=True)
    files = _file_names(int(index.get("generation", 0)))
    atomic_write_bytes(out / files["faiss"], vector_index.serialize(index["index"]))
    if index.get("image_tokens") is not None:  # numpy's own format, read back without pickle
        buffer = io.BytesIO()
        np.save(buffer, index["image_tokens"], allow_pickle=False)
        atomic_write_bytes(out / files["tokens"], buffer.getvalue())
    else:
        del files["tokens"]
    meta = {k: v for k, v in index.items() if k not in ("index", "image_tokens")}
    for key in ("vector_ids", "hidden_ids"):
        meta[key] = [int(i) for i in meta[key]]
    atomic_write_json(
        out / INDEX_FILE, {"format": INDEX_FORMAT, "files": files, **meta}, indent=1, ensure_ascii=False
    )
    for stale in [*out.glob("index*.faiss"), *out.glob("image_tokens*.npy")]:
        if stale.name not in files.values():
            stale.unlink(missing_ok=True)


def load_index(path: str | Path) -> dict:
    """What ``save_index`` wrote: the same dict ``index_embeddings`` returned."""
    path = Path(path)
    if not (path / INDEX_FILE).is_file():
        hint = " (indexes written as .pt pickles are no longer read: embed again)" if path.is_file() else ""
        raise FileNotFoundError(f"{path}: no embedding index ({INDEX_FILE}) there{hint}")
    meta = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))
    if meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: index format {meta.get('format')}, expected {INDEX_FORMAT}: embed again")
    files = meta.pop("files")
    index = vector_index.read_index(path / files["faiss"])
    for key in ("vector_ids", "hidden_ids"):
        meta[key] = np.asarray(meta[key], dtype=np.int64)
    if index.ntotal != len(meta["ids"]) + len(meta["hidden_ids"]) or len(meta["vector_ids"]) != len(
        meta["ids"]
    ):
        raise ValueError(
            f"{path}: {index.ntotal} vectors in the index for {len(meta['ids'])} ids "
            f"(+ {len(meta['hidden_ids'])} hidden)"
        )
    out = {**meta, "index": index}
    if meta.get("fusion_tokens"):
        out["image_tokens"] = np.load(path / files["tokens"], allow_pickle=False)
    return out


def rows_of(index: dict, vector_ids: np.ndarray) -> np.ndarray:
    """Positions in the index's sample lists (``"ids"``, ``"captions"``, ...) of faiss ids it returned."""
    known = index["vector_ids"]  # ascending: built 0..N-1, updates keep the order and append larger ids
    rows = np.searchsorted(known, vector_ids)
    if len(rows) and (rows.max() >= len(known) or not np.array_equal(known[rows], vector_ids)):
        raise ValueError("the faiss index returned an id that index.json does not list: embed again")
    return rows


def query(
    exported, index: dict, text: str, k: int = 5, rerank: int = 0, rerank_score: str = "itm"
) -> list[tuple[float, str, str]]:
    """Top-k images for ``text`` (``exported``: ``serving.load_exported``'s result): (score, sample id, its
    first caption), best first. The score is the cosine, or with ``rerank`` > 0 the fusion stage's score of
    the pair (its top ``rerank`` by cosine re-ordered by it, the rest after them by cosine)."""
    if index["dim"] != exported.meta["embed_dim"]:
        raise ValueError(
            f"the index holds {index['dim']}-d embeddings, the model {exported.path} makes "
            f"{exported.meta['embed_dim']}-d ones: query with the model that built it ({index['model']})"
        )
    tokens = exported.tokenize([text])
    q = exported.encode_tokens(tokens)
    scores, found_ids = vector_index.search(index["index"], q, max(k, rerank), index.get("hidden_ids"))
    found = found_ids[0] >= 0  # faiss pads a short result with -1
    scores, rows = scores[0][found], rows_of(index, found_ids[0][found])
    if rerank:
        scores, rows = rerank_rows(exported, index, tokens, scores, rows, rerank, rerank_score)
    return [
        (float(s), index["ids"][i], index["captions"][i]) for s, i in zip(scores[:k], rows[:k], strict=True)
    ]


def rerank_rows(exported, index: dict, tokens, scores, rows, k: int, score: str):
    """The first ``k`` of ``rows`` (by cosine ``scores``) re-ordered by the fusion stage's ITM score of
    (image, query), the rest after them."""
    if index.get("image_tokens") is None:
        raise ValueError(
            "--rerank: this index keeps no image token grids; build it with an export of a model trained "
            "with a fusion stage (model.fusion.layers > 0)"
        )
    top = rows[:k]
    states, padding = exported.text_states(tokens)
    n = len(top)
    logits = exported.itm_logits(
        index["image_tokens"][top], np.repeat(states, n, axis=0), np.repeat(padding, n, axis=0)
    )
    fused = logits[:, 1] - logits[:, 0]
    if score == "itm+itc":
        fused = fused + exported.meta["fusion"]["logit_scale"] * scores[:k]
    order = np.argsort(-fused, kind="stable")
    return np.concatenate([fused[order], scores[k:]]), np.concatenate([top[order], rows[k:]])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m autoglm_train.embed",
        description=__doc__.split("\n\n")[0],
        epilog="Embed and query in one call by giving --shards, --out and --query together; update and "
        "query with --shards, --index, --update and --query.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="an export directory written by python -m autoglm_train.compress (<run>/exports/<variant>: "
        "ONNX graphs, tokenizer.json, export.json)",
    )
    p.add_argument("--shards", help="webdataset shards to embed: a brace pattern or glob ('val-{0..3}.tar')")
    p.add_argument("--out", help="directory to write the index to (index.faiss + index.json)")
    p.add_argument("--index", help="an index directory written by --out, to query or to --update")
    p.add_argument(
        "--update",
        action="store_true",
        help="bring the --index up to date with --shards (in place, or written to --out): embed only the "
        "samples that are new or whose image or captions changed, drop those gone; the index keeps its "
        "kind and options, and must have been built with this --model",
    )
    p.add_argument("--query", action="append", help="text to search the index for (repeatable)")
    p.add_argument("--k", type=int, default=5, help="results per query (default: 5)")
    p.add_argument(
        "--rerank",
        type=int,
        default=0,
        help="re-rank each query's top N with the model's fusion stage (0: off, the default)",
    )
    p.add_argument(
        "--rerank-score", choices=("itm", "itm+itc"), default="itm", help="what re-ranking sorts by"
    )
    p.add_argument(
        "--index-type",
        choices=vector_index.KINDS,
        default=None,
        help="flat: exact search (default); hnsw or ivfpq: approximate, their recall@10 against exact "
        "is measured at build time and printed",
    )
    p.add_argument("--hnsw-m", type=int, default=32, help="hnsw: graph neighbours per vector (default: 32)")
    p.add_argument("--ef-search", type=int, default=64, help="hnsw: candidates kept while searching (64)")
    p.add_argument("--nprobe", type=int, default=16, help="ivfpq: buckets scanned per query (default: 16)")
    p.add_argument(
        "--rebuild-deleted-share",
        type=float,
        default=REBUILD_DELETED_SHARE,
        help="--update of an hnsw index: its graph cannot drop vectors, so removed ones are hidden at "
        f"search time until more than this share of the graph is hidden, then it is rebuilt from the "
        f"stored vectors (default: {REBUILD_DELETED_SHARE})",
    )
    p.add_argument("--batch-size", type=int, default=128, help="images per ONNX Runtime call (default: 128)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while embedding")
    return p


def _check_args(args, args_parser) -> None:
    if args.update:
        if not (args.shards and args.index):
            args_parser.error("--update needs --shards and the --index to update")
    elif args.shards and not args.out:
        args_parser.error("give --out to write a new index from --shards, or --index with --update")
    elif not (args.shards and args.out) and not (args.index and args.query):
        args_parser.error("give --shards and --out to embed, or --index and --query to search (or all four)")
    for name in ("k", "hnsw_m", "ef_search", "nprobe", "batch_size"):
        if getattr(args, name) < 1:
            args_parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.rerank < 0:
        args_parser.error(f"--rerank must be 0 (off) or a number of results to re-rank, got {args.rerank}")
    if not 0 <= args.rebuild_deleted_share <= 1:
        args_parser.error(f"--rebuild-deleted-share must be in [0, 1], got {args.rebuild_deleted_share}")


def _update(args) -> dict:
    start = time.perf_counter()
    index = load_index(args.index)
    if args.index_type and args.index_type != index["kind"]:
        raise ValueError(
            f"{args.index} is a {index['kind']} index; --update keeps its kind (embed again without "
            f"--update for a {args.index_type} one)"
        )
    index, counts = update_index(
        index,
        args.model,
        args.shards,
        args.batch_size,
        progress=not args.no_progress,
        threads=args.threads,
        rebuild_deleted_share=args.rebuild_deleted_share,
    )
    out = args.out or args.index
    save_index(index, out)
    hnsw, share = "", args.rebuild_deleted_share
    if index["kind"] == "hnsw":
        hnsw = (
            "; hnsw graph rebuilt"
            if counts["rebuilt"]
            else f"; {counts['hidden']} removed vectors hidden (rebuilt past {share:.0%} of the graph)"
        )
    recall = index.get("recall_at_10_vs_exact")
    print(
        f"updated {out}: {counts['added']} added, {counts['changed']} changed, {counts['removed']} removed, "
        f"{counts['unchanged']} unchanged -> {len(index['ids'])} image embeddings ({index['kind']} index"
        + (
            f", recall@10 against exact {recall:.4f} (measured at {index['recall_measured']})"
            if recall
            else ""
        )
        + f"{hnsw}; skipped: {index['skipped'] or 'none'}) in {time.perf_counter() - start:.1f} s"
    )
    return index


def main(argv=None) -> int:
    args_parser = parser()
    args = args_parser.parse_args(argv)
    _check_args(args, args_parser)
    try:
        index = None
        if args.update:
            index = _update(args)
        elif args.shards:
            kind = args.index_type or "flat"
            embedded = embed_shards(
                args.model, args.shards, args.batch_size, progress=not args.no_progress, threads=args.threads
            )
            index = index_embeddings(
                embedded, kind, hnsw_m=args.hnsw_m, ef_search=args.ef_search, nprobe=args.nprobe
            )
            save_index(index, args.out)
            recall = index.get("recall_at_10_vs_exact")
            print(
                f"{len(index['ids'])} image embeddings -> {args.out} ({kind} index"
                + (f", recall@10 against exact {recall:.4f}" if recall is not None else "")
                + f"; skipped: {index['skipped'] or 'none'})"
            )
        if args.query:
            index = index or load_index(args.index)
            exported = load_exported(args.model, args.threads)
            for text in args.query:
                print(f"\n{text!r}:")
                found = query(exported, index, text, args.k, args.rerank, args.rerank_score)
                for rank, (score, sample_id, caption) in enumerate(found, 1):
                    print(f"  {rank}. {score:.3f}  {sample_id}  {caption}")
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
