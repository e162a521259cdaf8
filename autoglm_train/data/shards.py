"""webdataset pipelines: shards -> decoded, transformed, tokenized batches.

A sample holds one image (``png``/``jpg``/``jpeg``/``webp``) and captions: a ``json`` with a list under
``captions`` (or the configured key; a single string is accepted) or a ``txt`` file. A sample that cannot be
used is skipped and counted by reason: ``bad_image`` (corrupt or undecodable), ``image_too_large`` (over
``MAX_IMAGE_PIXELS``, refused from its header before any pixel is decoded), ``missing_caption`` (none, or
only empty ones), ``bad_caption`` (not UTF-8, not json), ``caption_too_long`` (a caption over
``MAX_CAPTION_CHARS``). Tar-level errors (a damaged archive, a file that is not a tar at all) are counted
once per shard as ``tar_error``, the shard named in the warning. The counts ride along with the batches
(``batch["skipped"]``) because decoding runs in DataLoader worker processes whose counters the training
process cannot see.

Images of any mode become 8-bit RGB (``to_rgb``): 16-bit greyscale scaled (not clipped), CMYK converted,
transparency composited onto ``ALPHA_BACKGROUND`` (white).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import logging
import os
import random
import shutil
import signal
import tempfile
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info
from webdataset.filters import _shuffle

from autoglm_train.data import tar_reader
from autoglm_train.data.caption_negatives import CaptionNegatives, negative_fields
from autoglm_train.utils.processes import children_by_parent, descendants

log = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
AUGMENT_CHUNK = 32  # images transformed per swap of the stream's random states
# Larger images are refused from the size their header declares, before decoding: a decompression bomb (a
# tiny PNG declaring 30,000 x 30,000 pixels) would otherwise take gigabytes per loader worker. 8192 x 8192
# is 192 MiB decoded as RGB, far beyond what any image tower reads; PIL's own guard warns only from
# ~89 MP (Image.MAX_IMAGE_PIXELS) and refuses from twice that.
MAX_IMAGE_PIXELS = 8192 * 8192
# A longer caption is not a caption (a web page's text, a dump): its sample is skipped rather than a
# megabyte tokenized. Text towers keep 77 to 512 tokens, a few characters each, so a real caption's kept
# tokens all lie well within this.
MAX_CAPTION_CHARS = 10_000
ALPHA_BACKGROUND = (255, 255, 255)  # what transparent pixels become (white, as on most web pages)


class NoUsableSamplesError(RuntimeError):
    pass


class ImageTooLargeError(ValueError):
    """An image whose header declares more than ``MAX_IMAGE_PIXELS`` pixels (not decoded)."""


class ShardStallError(RuntimeError):
    """No batch from the data loader within ``data.timeout`` seconds; names the shards being read."""


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """Brace patterns (``train-{000000..000011}.tar``), local globs (``train-*.tar``, sorted) and lists of
    them, expanded to a flat list. A glob that matches nothing stays as it is, so it reads as missing."""
    if isinstance(shards, str):
        shards = [shards]
    urls: list[str] = []
    for s in shards:
        for url in wds.shardlists.expand_urls(str(s)):
            matches = sorted(glob.glob(url)) if is_local(url) and any(c in url for c in "*?") else []
            urls.extend(matches or [url])
    return urls


def epoch_samples_from_sizes(urls: Sequence[str]) -> int | None:
    """Samples in the shards according to the ``sizes.json`` beside them (``{"train-000000.tar": n}``, as
    the COCO converter and webdataset tools write it); None if any shard is not listed."""
    total, tables = 0, {}
    for url in urls:
        if not is_local(url):
            return None
        folder = Path(url).parent
        if folder not in tables:
            sizes = folder / "sizes.json"
            tables[folder] = json.loads(sizes.read_text()) if sizes.is_file() else {}
        count = tables[folder].get(Path(url).name)
        if count is None:
            return None
        total += int(count)
    return total


def missing_local_shards(urls: Sequence[str]) -> list[str]:
    return [u for u in urls if is_local(u) and not Path(u).exists()]


def sample_id_to_int(sample_id: str) -> int:
    """A stable int64 for a string id, so ids can be gathered across ranks as tensors."""
    return int.from_bytes(hashlib.blake2b(sample_id.encode(), digest_size=8).digest(), "little", signed=True)


class SkipCounter:
    """Counts unusable samples by reason in the process that decodes them; ``take()`` drains the counts."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}  # the first skip of each reason, for an error message

    def add(self, reason: str, where: str = "") -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, where)
        # the first few of each kind are worth a line in the log; after that the counts tell
        if self.counts[reason] <= 3:
            log.warning("skipped %s (%s) %s", "shard" if reason == "tar_error" else "sample", reason, where)

    def tar_error(self, exn: Exception) -> bool:
        # webdataset appends the shard's URL and its open stream to the arguments: the URL names it
        said = [str(a) for a in exn.args if not isinstance(a, io.IOBase | dict)]
        self.add("tar_error", f"{type(exn).__name__}: {' '.join(said)}")
        return True  # keep going with the next sample or shard

    def take(self) -> dict[str, int]:
        counts, self.counts = dict(self.counts), Counter()
        return counts

    def describe(self) -> str:
        """The counts by reason, each with its first example (for an error saying why nothing was left)."""
        return "; ".join(
            f"{reason} x{n} (first: {self.examples.get(reason, '?')})" for reason, n in self.counts.items()
        )


def read_captions(sample: dict, caption_key: str) -> list[str]:
    if "json" in sample:
        meta = json.loads(sample["json"])
        value = meta.get(caption_key) if isinstance(meta, dict) else None
    elif "txt" in sample:
        value = sample["txt"].decode("utf-8")
    else:
        value = None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return []
    return [c.strip() for c in value if isinstance(c, str) and c.strip()]


def open_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The image in ``data`` opened lazily (header read, no pixels decoded); ImageTooLargeError if it
    declares more than ``max_pixels`` pixels. PIL's decompression-bomb warning counts as that error too,
    never a decode with a warning beside it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLargeError(str(exc)) from None
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise ImageTooLargeError(f"{width}x{height} pixels, more than {max_pixels} (MAX_IMAGE_PIXELS)")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode PIL opens: 16-bit greyscale (``I;16*``, and ``I``, what 16-bit PNGs hold)
    scaled to 8 bits (PIL's own conversion clips it: everything above 255 white); CMYK through PIL's
    conversion; transparency (an alpha band, or a palette's or a colour's ``transparency``) composited onto
    ``ALPHA_BACKGROUND`` instead of dropped, which would show whatever colour the transparent pixels
    happen to hold. The full decode happens here, so a truncated file raises here."""
    if img.mode == "I" or img.mode.startswith("I;16"):
        img = img.convert("I").point(lambda v: v / 257 + 0.5).convert("L")  # 65535 -> 255, rounded
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (*ALPHA_BACKGROUND, 255)), rgba).convert(
            "RGB"
        )
    return img.convert("RGB")


def read_image(sample: dict) -> Image.Image:
    for key in IMAGE_KEYS:
        if key in sample:
            with open_image(sample[key]) as img:
                return to_rgb(img)
    raise KeyError(f"no image among {IMAGE_KEYS}")


def decode(sample: dict, caption_key: str, skips: SkipCounter) -> dict | None:
    where = f"{sample.get('__key__')} in {sample.get('__url__')}"
    try:
        captions = read_captions(sample, caption_key)
    except (UnicodeDecodeError, json.JSONDecodeError):
        skips.add("bad_caption", where)
        return None
    if not captions:
        skips.add("missing_caption", where)
        return None
    longest = max(len(c) for c in captions)
    if longest > MAX_CAPTION_CHARS:  # checked before anything tokenizes it
        skips.add("caption_too_long", f"{where}: {longest} characters, more than {MAX_CAPTION_CHARS}")
        return None
    try:
        image = read_image(sample)
    except ImageTooLargeError as exc:
        skips.add("image_too_large", f"{where}: {exc}")
        return None
    except Exception:  # PIL raises many types for corrupt data
        skips.add("bad_image", where)
        return None
    return {"image": image, "captions": captions, "id": sample["__key__"]}


def read_group(sample: dict, kinds: Sequence[str]) -> tuple[int, int]:
    """``(group, kind)`` of a held-out sample in a hard-negative group (its json's ``group`` name as an
    int, and the index of its ``varies`` in ``kinds``); ``(0, -1)`` for a sample in none."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    group = meta.get("group") if isinstance(meta, dict) else None
    kind = meta.get("varies") if group is not None else None
    if group is None or kind not in kinds:
        return 0, -1
    return sample_id_to_int(str(group)), kinds.index(kind)


def stable_seed(*parts) -> int:
    """A 63-bit seed from any parts, the same in every process (unlike ``hash``)."""
    key = "-".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class _PrivateRNG:
    """Python and torch generator states owned by the data stream. ``active()`` swaps them in for code
    that draws from the global generators (timm/torchvision augmentations) and swaps the caller's back, so
    data randomness never shifts the model's (dropout) and a stream replays exactly."""

    def __init__(self, seed: int):
        self.py_state = random.Random(seed).getstate()
        self.torch_state = torch.Generator().manual_seed(seed).get_state()

    @contextmanager
    def active(self):
        outer_py, outer_torch = random.getstate(), torch.get_rng_state()
        random.setstate(self.py_state)
        torch.set_rng_state(self.torch_state)
        try:
            yield
        finally:
            self.py_state, self.torch_state = random.getstate(), torch.get_rng_state()
            random.setstate(outer_py)
            torch.set_rng_state(outer_torch)


class _Stages:
    """Picklable pipeline stages sharing one SkipCounter within each worker process.

    Every random choice of the stream (shard order, sample shuffle, caption choice, augmentation) comes
    from generators seeded by (seed, epoch, rank, worker), so an epoch is a pure function of them.
    """

    def __init__(
        self,
        tokenizer,
        transform: Callable,
        caption_key: str,
        train: bool,
        seed: int,
        shuffle_buffer: int,
        group_kinds: Sequence[str] = (),
        text_negatives: CaptionNegatives | None = None,
    ):
        self.tokenizer = tokenizer
        self.text_negatives = text_negatives
        self.group_kinds = tuple(group_kinds)
        self.transform = transform
        self.caption_key = caption_key
        self.train = train
        self.seed, self.epoch = seed, 0
        self.shuffle_buffer = shuffle_buffer
        self.skips = SkipCounter()
        self.captions_rng = random.Random(0)
        self.negatives_rng = random.Random(0)

    def _stream_seed(self, purpose: str) -> int:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        return stable_seed(self.seed, self.epoch, rank, worker, purpose)

    def shuffle_shards(self, src: Iterator[dict]) -> Iterator[dict]:
        # the same order on every rank and worker: they split this list between them
        shards = list(src)
        random.Random(stable_seed(self.seed, self.epoch, "shards")).shuffle(shards)
        yield from shards

    def shuffle_samples(self, src: Iterator[dict]) -> Iterator[dict]:
        rng = random.Random(self._stream_seed("samples"))
        return _shuffle(src, self.shuffle_buffer, min(self.shuffle_buffer, 500), rng=rng)

    def decode_all(self, src: Iterator[dict]) -> Iterator[dict]:
        self.captions_rng = random.Random(self._stream_seed("captions"))
        self.negatives_rng = random.Random(self._stream_seed("negatives"))
        augment_rng = _PrivateRNG(self._stream_seed("augment"))
        pending: list[dict] = []
        for sample in src:
            out = decode(sample, self.caption_key, self.skips)
            if out is not None:
                if self.group_kinds and not self.train:
                    out["group"], out["group_kind"] = read_group(sample, self.group_kinds)
                pending.append(out)
            if len(pending) == AUGMENT_CHUNK:
                yield from self._transform(pending, augment_rng)
                pending = []
        yield from self._transform(pending, augment_rng)

    def _transform(self, samples: list[dict], augment_rng: _PrivateRNG) -> list[dict]:
        # generator states are swapped in once per chunk, not per image: swapping costs as much as a
        # tenth of decoding a small image
        with augment_rng.active():
            for sample in samples:
                sample["image"] = self.transform(sample["image"])
        return samples

    def collate_train(self, samples: list[dict]) -> dict:
        # one caption per image per step; several captions of an image take turns across epochs
        captions = [self.captions_rng.choice(s["captions"]) for s in samples]
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "text": self.tokenizer(captions),
            "id": torch.tensor([sample_id_to_int(s["id"]) for s in samples]),
            "skipped": self.skips.take(),
            **negative_fields(self.text_negatives, captions, self.negatives_rng, self.tokenizer),
        }

    def carry_trailing_skips(self, src: Iterator[dict]) -> Iterator[dict]:
        # samples skipped after the last batch was made would ride with no batch: hold each batch back
        # until the next exists, and give the last one what was skipped after it
        held = None
        for batch in src:
            if held is not None:
                yield held
            held = batch
        if held is not None:
            for reason, count in self.skips.take().items():
                held["skipped"][reason] = held["skipped"].get(reason, 0) + count
            yield held

    def collate_eval(self, samples: list[dict]) -> dict:
        ids = [sample_id_to_int(s["id"]) for s in samples]
        captions = [c for s in samples for c in s["captions"]]
        caption_ids = [i for s, i in zip(samples, ids, strict=True) for _ in s["captions"]]
        batch = {
            "image": torch.stack([s["image"] for s in samples]),
            "id": torch.tensor(ids),
            "text": self.tokenizer(captions),
            "text_id": torch.tensor(caption_ids),
            "skipped": self.skips.take(),
        }
        if self.group_kinds:
            batch["group"] = torch.tensor([s["group"] for s in samples])
            batch["group_kind"] = torch.tensor([s["group_kind"] for s in samples])
        return batch


class ShardPipeline(wds.DataPipeline):
    """A webdataset pipeline whose random choices are seeded per epoch (``set_epoch`` before iterating)."""

    def __init__(self, stages: _Stages, *steps):
        super().__init__(*steps)
        self.stages = stages

    def set_epoch(self, epoch: int) -> None:
        self.stages.epoch = epoch


STALL_HINT = (
    "A shard that never delivers (a pipe: command or a server that hangs) or a stuck loader worker stops "
    "training: read that shard by hand (run its pipe: command, fetch its URL), drop it from the shard list, "
    "or raise data.timeout (0 or null waits forever)."
)


def _remove_folder(folder: str, owner_pid: int) -> None:
    # a forked worker holds a copy of the watch: only the process that made the folder removes it
    if os.getpid() == owner_pid:
        shutil.rmtree(folder, ignore_errors=True)


class ShardWatch:
    """Which shard each DataLoader worker is reading, so that a stalled loader can name it.

    Workers are other processes (forked or spawned), so each writes the URL it hands to the tar reader next,
    and its pid, into a small file of its own in a private folder (``record``, a pipeline stage after
    ``split_by_worker``); ``watch`` wraps the loader's iterator and turns its timeout into a
    ``ShardStallError`` naming them. Pickles as its folder's path, so spawned workers write there too.
    """

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="autoglm-shard-watch-")
        weakref.finalize(self, _remove_folder, self.folder, os.getpid())

    def _worker_file(self, worker: int) -> Path:
        return Path(self.folder) / f"worker-{worker}.json"

    def _stop_file(self) -> Path:
        return Path(self.folder) / "stop"

    def record(self, shards: Iterator[dict]) -> Iterator[dict]:
        """Pipeline stage: notes each shard this worker opens (in the training process, nothing to note)."""
        worker = get_worker_info()
        for shard in shards:
            if worker is not None:
                if self._stop_file().exists():
                    return  # the loader stalled and is being shut down: open nothing more
                self._note(worker.id, shard["url"])
            yield shard

    def _note(self, worker: int, url: str) -> None:
        # written aside and renamed, so the training process never reads half a file
        path = self._worker_file(worker)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps({"url": url, "pid": os.getpid()}))
        os.replace(partial, path)

    def reset(self) -> None:
        """Before a new iteration starts its workers: no stale notes, no stop."""
        for path in Path(self.folder).iterdir():
            path.unlink(missing_ok=True)

    def reading(self) -> dict[int, dict]:
        """{worker id: {"url", "pid"}} of the workers that have opened a shard in this iteration."""
        notes = {}
        for path in Path(self.folder).glob("worker-*.json"):
            try:
                notes[int(path.stem.split("-")[1])] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
        return notes

    def watch(self, batches: Iterator, timeout: float) -> Iterator:
        """``batches`` (a DataLoader iterator), whose timeout becomes a ShardStallError naming the shards."""
        try:
            yield from batches
        except RuntimeError as exc:
            if not str(exc).startswith("DataLoader timed out"):
                raise
            reading = self.reading()
            try:
                self._stop_workers(batches, reading)
            except Exception:  # cleaning up is a courtesy: the stall is the error to report
                log.warning("could not stop the stalled loader's workers", exc_info=True)
            raise ShardStallError(stall_message(timeout, reading, _awaited_worker(batches))) from exc

    def _stop_workers(self, batches: Iterator, reading: dict[int, dict]) -> None:
        # A worker blocked on a pipe: shard neither notices the loader shutting down nor takes its pipe's
        # processes with it when terminated (a `sleep`, a `curl` would outlive the run). End them, so the
        # worker's read returns; the stop file keeps it from opening the next shard.
        self._stop_file().touch()
        if Path("/proc").is_dir():
            children = children_by_parent()
            ours = set(descendants(os.getpid(), children))  # never a pid reused by someone else's process
            for note in reading.values():
                if note.get("pid") in ours:
                    for pid in descendants(note["pid"], children):
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.kill(pid, signal.SIGTERM)
        shutdown = getattr(batches, "_shutdown_workers", None)  # what the iterator's __del__ does, now
        if shutdown is not None:
            shutdown()


def _awaited_worker(batches: Iterator) -> int | None:
    """The worker whose batch the loader waits for (it takes them in turn); None if torch does not say."""
    try:
        return batches._task_info[batches._rcvd_idx][0]
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


def stall_message(timeout: float, reading: dict[int, dict], awaited: int | None) -> str:
    workers = sorted(reading, key=lambda w: (w != awaited, w))  # the one the loader waits for first
    said = [f"worker {w} was reading {reading[w]['url']}" for w in workers]
    if awaited is not None and awaited not in reading:
        said.insert(0, f"worker {awaited} had not opened a shard yet")
    return (
        f"no batch from the data loader in {timeout:g} s (data.timeout); "
        f"{'; '.join(said) or 'no worker had opened a shard yet'}. {STALL_HINT}"
    )


class WatchedLoader(DataLoader):
    """A DataLoader whose timeout (``timeout`` seconds without a batch) raises a ShardStallError naming the
    shards its workers were reading. Set ``shard_watch`` to the ShardWatch recording in its pipeline."""

    shard_watch: ShardWatch | None = None

    def __iter__(self):
        if self.shard_watch is None or not self.timeout:
            return super().__iter__()
        self.shard_watch.reset()
        return self.shard_watch.watch(super().__iter__(), self.timeout)


def build_pipeline(
    shards: str | Sequence[str],
    *,
    tokenizer,
    transform: Callable,
    batch_size: int,
    train: bool,
    caption_key: str = "captions",
    shuffle_buffer: int = 2000,
    resampled: bool = False,
    seed: int = 0,
    shard_watch: ShardWatch | None = None,
    group_kinds: Sequence[str] = (),
    text_negatives: CaptionNegatives | None = None,
) -> ShardPipeline:
    """``shard_watch``: notes which shard each loader worker reads (see WatchedLoader). ``group_kinds``:
    held-out batches also carry each image's hard-negative ``group`` and ``group_kind`` (see read_group).
    ``text_negatives``: training batches also carry each caption's generated negatives
    (data/caption_negatives.py)."""
    urls = expand_shards(shards)
    stages = _Stages(
        tokenizer,
        transform,
        caption_key,
        train,
        seed,
        shuffle_buffer,
        group_kinds,
        text_negatives if train else None,
    )
    steps: list = [wds.ResampledShards(urls, seed=seed) if resampled else wds.SimpleShardList(urls)]
    if train and not resampled:
        steps.append(stages.shuffle_shards)
    steps += [wds.split_by_node, wds.split_by_worker]
    if shard_watch is not None:
        steps.append(shard_watch.record)
    steps.append(wds.tarfile_to_samples(handler=stages.skips.tar_error))
    if train:
        steps.append(stages.shuffle_samples)
    steps += [
        stages.decode_all,
        # training drops the short last batch so every rank gathers equal-sized batches
        wds.batched(
            batch_size, collation_fn=stages.collate_train if train else stages.collate_eval, partial=not train
        ),
        stages.carry_trailing_skips,
    ]
    return ShardPipeline(stages, *steps)


def existing_shards(shards: str | Sequence[str]) -> list[str]:
    """The shard list expanded; FileNotFoundError naming them if a local shard does not exist."""
    urls = expand_shards(shards)
    missing = missing_local_shards(urls)
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards do not exist, e.g. {missing[:3]}")
    return urls


def raw_samples(urls: Sequence[str], skips: SkipCounter) -> Iterator[dict]:
    """The shards' samples as stored (webdataset dicts: ``__key__``, ``__url__``, one bytes value per
    member), in shard order, in this process; unreadable tar members counted in ``skips``. Local ``.tar``
    files are read by ``tar_reader`` (the same samples, an order of magnitude less CPU), the rest by
    webdataset."""
    for url in urls:
        if is_local(url) and url.endswith(".tar"):
            yield from tar_reader.samples(url, skips.tar_error)
        else:
            yield from wds.DataPipeline(
                wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=skips.tar_error)
            )


def usable_samples(urls: Sequence[str], caption_key: str, skips: SkipCounter) -> Iterator[dict]:
    """Decoded samples in shard order, in this process; unusable ones skipped and counted in ``skips``."""
    for sample in raw_samples(urls, skips):
        out = decode(sample, caption_key, skips)
        if out is not None:
            yield out


def content_digest(sample: dict) -> str:
    """A digest of the raw bytes a raw sample (``raw_samples``) gives ``decode``: its image and the field
    its captions are read from (``json``, else ``txt``), each named. Equal digests: the same decoded
    sample, without decoding it or parsing its json (whose other fields then count too: a change there
    reads as a change of the sample, the safe side)."""
    h = hashlib.blake2b(digest_size=16)
    for fields in (IMAGE_KEYS, ("json", "txt")):
        for key in fields:
            if key in sample:
                h.update(f"{key} {len(sample[key])}\0".encode())  # named and sized: no two splits alike
                h.update(sample[key])
                break
    return h.hexdigest()


def first_usable_sample(shards: str | Sequence[str], caption_key: str = "captions") -> dict:
    """Reads until one usable sample; raises NoUsableSamplesError naming the shards if there is none."""
    urls = existing_shards(shards)
    skips = SkipCounter()
    for out in usable_samples(urls, caption_key, skips):
        return out
    raise NoUsableSamplesError(
        f"no usable sample in {len(urls)} shard(s) {urls[:3]}{' ...' if len(urls) > 3 else ''}: "
        f"skipped {skips.describe() or 'nothing (the shards hold no samples)'}; "
        f"each sample needs an image ({'/'.join(IMAGE_KEYS)}) and captions (json key '{caption_key}' or txt)"
    )


def iter_captions(
    shards: str | Sequence[str], caption_key: str = "captions", limit: int | None = None
) -> Iterator[str]:
    """Captions of the shards without decoding images (for training a tokenizer)."""
    urls = expand_shards(shards)
    skips = SkipCounter()
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(
            handler=skips.tar_error, select_files=lambda name: not name.endswith(IMAGE_KEYS)
        ),
    )
    n = 0
    for sample in pipeline:
        try:
            captions = read_captions(sample, caption_key)
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        yield from (c for c in captions if len(c) <= MAX_CAPTION_CHARS)  # as training skips them
        n += 1
        if limit is not None and n >= limit:
            return
