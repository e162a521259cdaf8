"""Embed a shard set with an exported model on ONNX Runtime, keep the embeddings in a faiss index, and
answer text -> image queries from it.

    python -m autoglm_train.embed --model EXPORT_DIR --shards 'data/shapes/<spec>/val-*.tar' --out index
    python -m autoglm_train.embed --model EXPORT_DIR --index index --query "a red circle" --k 5
    python -m autoglm_train.embed --model EXPORT_DIR --index index --query "..." --rerank 16

``--rerank K`` (a model trained with a fusion stage, model.fusion.layers > 0): the index's top K images
for each query are re-scored by the exported fusion stage's image-text matching head and re-ordered
(``--rerank-score itm``: its match log-odds; ``itm+itc``: plus the scaled cosine), at K fusion passes a
query. An index built from such a model keeps each image's token grid for it (``image_tokens.npy``).

The model is an export of ``python -m autoglm_train.compress`` (ONNX graphs + tokenizer, fp32 or int8:
``<run>/exports/<variant>``). The index is a directory holding no pickle, so reading one handed over by
someone else runs no code: ``index.faiss`` (faiss's own format) and ``index.json`` (sample ids, first
captions, shards, model, skipped samples, the index kind and, for an approximate one, its recall@10
against exact search measured when it was built).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from autoglm_train import vector_index
from autoglm_train.compress.serving import load_exported
from autoglm_train.data.shards import SkipCounter, existing_shards, usable_samples
from autoglm_train.utils.files import atomic_write_bytes, atomic_write_json

INDEX_FORMAT = 2  # 1: embeddings.safetensors searched by brute force
FAISS_FILE, INDEX_FILE, TOKENS_FILE = "index.faiss", "index.json", "image_tokens.npy"
RECALL_QUERIES = 1000  # stored vectors used as queries to measure an approximate index against exact search


def image_batches(
    urls: list[str], transform, batch_size: int, skips: SkipCounter
) -> Iterator[tuple[list, list, list]]:
    """(ids, first captions, image tensors) per batch, in shard order; unusable samples skipped, counted."""
    ids, captions, images = [], [], []
    for out in usable_samples(urls, "captions", skips):
        ids.append(out["id"])
        captions.append(out["captions"][0])
        images.append(transform(out["image"]))
        if len(images) == batch_size:
            yield ids, captions, images
            ids, captions, images = [], [], []
    if images:
        yield ids, captions, images


def embed_shards(
    model_dir: str | Path, shards, batch_size: int = 128, progress: bool = True, threads: int | None = None
) -> dict:
    """Image embeddings of every usable sample in ``shards``, in shard order:
    ``{"ids", "captions", "image" (N, D) float32, "shards", "model", "skipped"}``."""
    import timm.data
    import torch

    exported = load_exported(model_dir, threads)
    transform = timm.data.create_transform(**exported.meta["preprocess"], is_training=False)
    urls = existing_shards(shards)
    skips = SkipCounter()
    all_ids, all_captions, parts, grids = [], [], [], []
    with tqdm(desc="embedding images", unit="img", disable=not progress) as bar:
        for ids, captions, images in image_batches(urls, transform, batch_size, skips):
            batch = torch.stack(images).numpy()
            parts.append(exported.encode_image(batch))
            if exported.has_fusion:  # each image's token grid, for re-ranking queries with the fusion stage
                grids.append(exported.image_tokens(batch))
            all_ids += ids
            all_captions += captions
            bar.update(len(ids))
    if not parts:
        raise ValueError(f"no usable image in {len(urls)} shard(s); skipped {dict(skips.counts)}")
    return {
        "ids": all_ids,
        "captions": all_captions,
        "image": np.concatenate(parts),
        **({"image_tokens": np.concatenate(grids)} if grids else {}),
        "shards": urls,
        "model": str(model_dir),
        "skipped": dict(skips.counts),
    }


def index_embeddings(embedded: dict, kind: str = "flat", k: int = 10, **options) -> dict:
    """``embed_shards``' result with its faiss index (``"index"``) in place of the raw array; for an
    approximate kind, its recall@k against exact search on up to ``RECALL_QUERIES`` stored vectors."""
    vectors = embedded["image"]
    index = vector_index.build_index(vectors, kind, **options)
    out = {k_: v for k_, v in embedded.items() if k_ != "image"}
    out["fusion_tokens"] = "image_tokens" in embedded
    out.update(index=index, kind=kind, dim=int(vectors.shape[1]))
    if kind != "flat":
        rows = np.random.default_rng(0).permutation(len(vectors))[:RECALL_QUERIES]
        exact = vector_index.build_index(vectors, "flat")
        _, truth = vector_index.search(exact, vectors[rows], k)
        _, found = vector_index.search(index, vectors[rows], k)
        out[f"recall_at_{k}_vs_exact"] = vector_index.recall_at_k(found, truth)
    return out


def save_index(index: dict, out: str | Path) -> None:
    """``index_embeddings``' result as a directory: the faiss index first, then the JSON that describes
    it, so an index whose JSON exists is complete."""
    out = Path(out)
    if out.is_file():
        raise ValueError(f"{out} is a file: an index is a directory ({FAISS_FILE} + {INDEX_FILE})")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / FAISS_FILE, vector_index.serialize(index["index"]))
    if index.get("image_tokens") is not None:  # numpy's own format, read back without pickle
        buffer = io.BytesIO()
        np.save(buffer, index["image_tokens"], allow_pickle=False)
        atomic_write_bytes(out / TOKENS_FILE, buffer.getvalue())
    meta = {k: v for k, v in index.items() if k not in ("index", "image_tokens")}
    atomic_write_json(out / INDEX_FILE, {"format": INDEX_FORMAT, **meta}, indent=1, ensure_ascii=False)


def load_index(path: str | Path) -> dict:
    """What ``save_index`` wrote: the same dict ``index_embeddings`` returned."""
    path = Path(path)
    if not (path / INDEX_FILE).is_file():
        hint = " (indexes written as .pt pickles are no longer read: embed again)" if path.is_file() else ""
        raise FileNotFoundError(f"{path}: no embedding index ({INDEX_FILE}) there{hint}")
    meta = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))
    if meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: index format {meta.get('format')}, expected {INDEX_FORMAT}: embed again")
    index = vector_index.read_index(path / FAISS_FILE)
    if index.ntotal != len(meta["ids"]):
        raise ValueError(f"{path}: {index.ntotal} vectors in the index for {len(meta['ids'])} ids")
    out = {**meta, "index": index}
    if meta.get("fusion_tokens"):
        out["image_tokens"] = np.load(path / TOKENS_FILE, allow_pickle=False)
    return out


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
    scores, rows = vector_index.search(index["index"], q, max(k, rerank))
    found = rows[0] >= 0  # faiss pads a short result with -1
    scores, rows = scores[0][found], rows[0][found]
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
        epilog="Embed and query in one call by giving --shards, --out and --query together.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="an export directory written by python -m autoglm_train.compress (<run>/exports/<variant>: "
        "ONNX graphs, tokenizer.json, export.json)",
    )
    p.add_argument("--shards", help="webdataset shards to embed: a brace pattern or glob ('val-{0..3}.tar')")
    p.add_argument("--out", help="directory to write the index to (index.faiss + index.json)")
    p.add_argument("--index", help="an index directory written by --out, to query")
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
        default="flat",
        help="flat: exact search (default); hnsw or ivfpq: approximate, their recall@10 against exact "
        "is measured at build time and printed",
    )
    p.add_argument("--hnsw-m", type=int, default=32, help="hnsw: graph neighbours per vector (default: 32)")
    p.add_argument("--ef-search", type=int, default=64, help="hnsw: candidates kept while searching (64)")
    p.add_argument("--nprobe", type=int, default=16, help="ivfpq: buckets scanned per query (default: 16)")
    p.add_argument("--batch-size", type=int, default=128, help="images per ONNX Runtime call (default: 128)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while embedding")
    return p


def main(argv=None) -> int:
    args_parser = parser()
    args = args_parser.parse_args(argv)
    if not (args.shards and args.out) and not (args.index and args.query):
        args_parser.error("give --shards and --out to embed, or --index and --query to search (or all four)")
    for name in ("k", "hnsw_m", "ef_search", "nprobe", "batch_size"):
        if getattr(args, name) < 1:
            args_parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.rerank < 0:
        args_parser.error(f"--rerank must be 0 (off) or a number of results to re-rank, got {args.rerank}")
    try:
        index = None
        if args.shards:
            embedded = embed_shards(
                args.model, args.shards, args.batch_size, progress=not args.no_progress, threads=args.threads
            )
            index = index_embeddings(
                embedded, args.index_type, hnsw_m=args.hnsw_m, ef_search=args.ef_search, nprobe=args.nprobe
            )
            save_index(index, args.out)
            recall = index.get("recall_at_10_vs_exact")
            print(
                f"{len(index['ids'])} image embeddings -> {args.out} ({args.index_type} index"
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
