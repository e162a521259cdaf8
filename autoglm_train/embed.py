"""Embed a shard set with an exported model, and answer text -> image queries from the embeddings.

    python -m autoglm_train.embed --model EXPORT_DIR --shards 'data/shapes/<spec>/val-*.tar' \\
        --out embeddings
    python -m autoglm_train.embed --model EXPORT_DIR --index embeddings --query "a red circle" --k 5

The model is what ``python -m autoglm_train.compress`` exported (TorchScript encoders + tokenizer), so
this works for the original and every compressed variant alike. The index is a directory holding no
pickle, so reading one handed over by someone else runs no code: ``embeddings.safetensors`` (the image
embeddings, one row per sample) and ``index.json`` (sample ids, first captions, shards, model, skips).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import timm.data
import torch
from safetensors.torch import load_file, save
from tqdm import tqdm

from autoglm_train.compress.export import load_exported
from autoglm_train.data.shards import SkipCounter, existing_shards, usable_samples
from autoglm_train.utils.files import atomic_write_bytes, atomic_write_json

INDEX_FORMAT = 1
EMBEDDINGS_FILE, INDEX_FILE = "embeddings.safetensors", "index.json"


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


@torch.no_grad()
def embed_shards(model_dir: str | Path, shards, batch_size: int = 128, progress: bool = True) -> dict:
    exported = load_exported(model_dir)
    transform = timm.data.create_transform(**exported["meta"]["preprocess"], is_training=False)
    urls = existing_shards(shards)
    skips = SkipCounter()
    all_ids, all_captions, parts = [], [], []
    bar = tqdm(desc="embedding images", unit="img", disable=not progress)
    for ids, captions, images in image_batches(urls, transform, batch_size, skips):
        parts.append(exported["image"](torch.stack(images)).float())
        all_ids += ids
        all_captions += captions
        bar.update(len(ids))
    bar.close()
    if not parts:
        raise ValueError(f"no usable image in {len(urls)} shard(s); skipped {dict(skips.counts)}")
    return {
        "ids": all_ids,
        "captions": all_captions,
        "image": torch.cat(parts),
        "shards": urls,
        "model": str(model_dir),
        "skipped": dict(skips.counts),
    }


def save_index(index: dict, out: str | Path) -> None:
    """``embed_shards``' result as a directory: embeddings (safetensors) first, then the JSON that
    describes them, so an index whose JSON exists is complete."""
    out = Path(out)
    if out.is_file():
        raise ValueError(f"{out} is a file: an index is a directory ({EMBEDDINGS_FILE} + {INDEX_FILE})")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / EMBEDDINGS_FILE, save({"image": index["image"].contiguous()}))
    meta = {k: v for k, v in index.items() if k != "image"}
    atomic_write_json(out / INDEX_FILE, {"format": INDEX_FORMAT, **meta}, indent=1, ensure_ascii=False)


def load_index(path: str | Path) -> dict:
    """What ``save_index`` wrote: the same dict ``embed_shards`` returned."""
    path = Path(path)
    if not (path / INDEX_FILE).is_file():
        hint = " (indexes written as .pt pickles are no longer read: embed again)" if path.is_file() else ""
        raise FileNotFoundError(f"{path}: no embedding index ({INDEX_FILE}) there{hint}")
    meta = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))
    if meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: index format {meta.get('format')}, expected {INDEX_FORMAT}")
    image = load_file(str(path / EMBEDDINGS_FILE))["image"]
    if image.shape[0] != len(meta["ids"]):
        raise ValueError(f"{path}: {image.shape[0]} embeddings for {len(meta['ids'])} ids")
    return {**meta, "image": image}


@torch.no_grad()
def query(exported: dict, index: dict, text: str, k: int = 5) -> list[tuple[float, str, str]]:
    """Top-k images for ``text`` (``exported``: ``load_exported``'s result): (cosine score, sample id, its
    first caption), best first."""
    tokens = torch.tensor([exported["tokenizer"].encode(text).ids], dtype=torch.long)
    q = exported["text"](tokens).float()[0]
    scores = index["image"] @ q
    top = scores.topk(min(k, scores.numel()))
    hits = zip(top.values.tolist(), top.indices.tolist(), strict=True)
    return [(score, index["ids"][i], index["captions"][i]) for score, i in hits]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, help="an export directory (python -m autoglm_train.compress)"
    )
    parser.add_argument("--shards", help="shards to embed (brace pattern or glob)")
    parser.add_argument("--out", help="directory to write the index to (embeddings + JSON)")
    parser.add_argument("--index", help="an index directory written by --out, to query")
    parser.add_argument("--query", action="append", help="text to search for (repeatable)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not (args.shards and args.out) and not (args.index and args.query):
        parser.error("give --shards and --out to embed, or --index and --query to search (or all four)")
    try:
        index = None
        if args.shards:
            index = embed_shards(args.model, args.shards, args.batch_size, progress=not args.no_progress)
            save_index(index, args.out)
            print(
                f"{len(index['ids'])} image embeddings -> {args.out} (skipped: {index['skipped'] or 'none'})"
            )
        if args.query:
            index = index or load_index(args.index)
            exported = load_exported(args.model)
            for text in args.query:
                print(f"\n{text!r}:")
                for rank, (score, sample_id, caption) in enumerate(query(exported, index, text, args.k), 1):
                    print(f"  {rank}. {score:.3f}  {sample_id}  {caption}")
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
