"""Samples/s of our training data pipeline (read, decode, transform, tokenize, batch) per loader worker
count, against a plain loop over the same tar files doing the same work in one process.

The plain loop reads each tar with ``tarfile``, pairs members by key, decodes the image with PIL, applies
the same transform object, picks one caption, and tokenizes and stacks each batch: what a hand-written
loader would do, without shuffling, skip counting or worker processes. Both read the same shapes shards
(written on first use) and stop after the same number of samples; rounds interleave the loaders and
each figure is the median over rounds. Rewrites the data-throughput section of
docs/results.md. Last line: one JSON object; ``ratio`` = ours at 1 worker / plain loop (target >= 0.9),
plus the figure per worker count.

    python bench/data_throughput.py [--samples 6000] [--batch-size 128] [--workers 0,1,2] [--rounds 3]
                                    [--no-write]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import statistics
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import timm
import torch
from PIL import Image

from autoglm_train.data.shapes import write_shapes_shards
from autoglm_train.data.shards import iter_captions
from autoglm_train.data.tokenizer import train_bpe
from autoglm_train.lit.datamodule import ShardDataModule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_comparison import RESULTS, ROOT, replace_section  # noqa: E402


def plain_samples(paths: list[str]) -> Iterator[tuple[bytes, bytes]]:
    """(image bytes, json bytes) per sample, straight from the tar files."""
    for path in paths:
        with tarfile.open(path) as tar:
            pending: dict[str, dict[str, bytes]] = {}
            for member in tar:
                key, _, ext = member.name.partition(".")
                pending.setdefault(key, {})[ext] = tar.extractfile(member).read()
                if "png" in pending[key] and "json" in pending[key]:
                    sample = pending.pop(key)
                    yield sample["png"], sample["json"]


def plain_loop(paths: list[str], transform, tokenizer, batch_size: int, samples: int) -> float:
    rng = random.Random(0)
    images, captions, seen = [], [], 0
    start = time.perf_counter()
    for png, meta in plain_samples(paths):
        with Image.open(io.BytesIO(png)) as img:
            images.append(transform(img.convert("RGB")))
        captions.append(rng.choice(json.loads(meta)["captions"]))
        if len(images) == batch_size:
            batch = {"image": torch.stack(images), "text": tokenizer(captions)}
            seen += batch["image"].shape[0]
            images, captions = [], []
            if seen >= samples:
                break
    return seen / (time.perf_counter() - start)


def ours(datamodule: ShardDataModule, workers: int, samples: int) -> float:
    """Steady state: worker start-up and the filling of each worker's shuffle buffer (it reads two samples
    per sample it yields until full: a one-off cost per epoch) happen before the clock starts."""
    datamodule.num_workers = workers
    it = iter(datamodule._loader(train=True))
    warmup = math.ceil(2 * datamodule.shuffle_buffer / datamodule.batch_size) * max(workers, 1)
    for _ in range(warmup):
        next(it)
    seen, start = 0, time.perf_counter()
    for batch in it:
        seen += batch["image"].shape[0]
        if seen >= samples:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/results.md alone")
    args = parser.parse_args()
    worker_counts = [int(w) for w in args.workers.split(",")]
    torch.set_num_threads(1)  # the loader's work is per process; one thread each keeps the comparison fair

    made = write_shapes_shards(ROOT / "data" / "shapes")  # the default job's set (reused if present)
    paths = made["train"]
    tokenizer = train_bpe(iter_captions(paths, limit=5000), 1000, 32, 2)
    datamodule = ShardDataModule(
        paths, made["val"], batch_size=args.batch_size, image_size=64, shuffle_buffer=1000, num_workers=0
    )
    datamodule.attach(tokenizer, timm.create_model("resnet18", pretrained=False).pretrained_cfg)
    transform = datamodule.train_transform

    # interleaved rounds, medians: machine noise hits every loader alike
    rates: dict[str, list[float]] = {"plain": [], **{str(w): [] for w in worker_counts}}
    for _ in range(args.rounds):
        rates["plain"].append(plain_loop(paths, transform, tokenizer, args.batch_size, args.samples))
        for w in worker_counts:
            rates[str(w)].append(ours(datamodule, w, args.samples))
    plain = statistics.median(rates["plain"])
    results = {w: statistics.median(rates[str(w)]) for w in worker_counts}
    for name, values in rates.items():
        label = "plain loop" if name == "plain" else f"ours, {name} workers"
        print(f"{label:>16}: " + " ".join(f"{v:7.1f}" for v in values) + " samples/s", file=sys.stderr)

    lines = [
        f"`python bench/data_throughput.py --samples {args.samples} --batch-size {args.batch_size}`: "
        "shapes training shards (64 px PNG), training transform (random resized crop, normalize), BPE "
        f"tokenizer, batches of {args.batch_size}; one torch thread per process. Plain loop: `tarfile` + "
        f"PIL + the same transform and tokenizer in one process. Medians of {args.rounds} interleaved "
        "rounds. 0 workers: our pipeline in the training process; n: n loader processes. Ours is timed "
        "in steady state, after its shuffle buffer (1,000) has filled.",
        "",
        "| loader | samples/s | vs plain loop |",
        "|---|---|---|",
        f"| plain loop | {plain:.1f} | 1.000 |",
    ]
    lines += [f"| ours, {w} workers | {r:.1f} | {r / plain:.3f} |" for w, r in results.items()]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        RESULTS.write_text(
            replace_section(RESULTS.read_text(), "data_throughput", "## Data pipeline throughput\n\n" + table)
        )
    headline = results.get(1, next(iter(results.values())))
    print(
        json.dumps(
            {
                "bench": "data_throughput",
                "plain_samples_per_s": round(plain, 1),
                **{f"ours_{w}_workers": round(r, 1) for w, r in results.items()},
                "ratio": round(headline / plain, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
