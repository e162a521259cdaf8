"""COCO Captions (+ Karpathy split) -> webdataset shards that ``data=coco`` / ``data=wds`` read.

    python -m autoglm_train.data.coco --images DIR --captions captions_train2017.json captions_val2017.json \\
        --karpathy dataset_coco.json --out data/coco

Each sample, keyed by the zero-padded image id, holds the image bytes exactly as stored (``jpg`` or ``png``)
and ``json`` = ``{"id", "captions": [all of them, annotation order], "split", "file_name"}``. The split comes
from the Karpathy file (train + restval -> ``train``, ``val``, ``test``) or, without one, from the captions
file name. Samples of a split are ordered by image id and cut into ``{split}-{i:06d}.tar`` shards of
``shard_size``, so the shard a sample lands in is a pure function of the inputs; that is what makes an
interrupted conversion resumable: finished shards are kept, each shard is written under a temporary name
and renamed when complete, and a rerun writes only what is missing.

Beside the shards: ``sizes.json`` (samples per shard, as webdataset tools expect), ``manifest.json`` (per
split the brace pattern, shard/sample/caption counts; skip counts; missing images) and
``missing_images.txt``. Images absent from disk are counted, listed and skipped, not fatal: a partial COCO
download still converts. Inputs that are not what they claim to be (missing, not JSON, wrong shape) are
refused with a ``ConversionError`` naming the file and what was expected.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import sys
import tarfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock
from tqdm import tqdm

from autoglm_train.utils.files import atomic_write_text

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLIT_ORDER = ("train", "val", "test")
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
# image suffix on disk -> sample key in the shard (readers accept png/jpg/jpeg/webp; jpeg files stay "jpg")
IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".jpe": "jpg", ".png": "png", ".webp": "webp"}
SKIP_REASONS = ("missing_image", "no_captions", "not_in_karpathy", "unsupported_format")
TMP_SUFFIX = ".tmp"


class ConversionError(ValueError):
    """Inputs or output folder that cannot be converted; the message says which file and what to do."""


@dataclass
class ImageEntry:
    """One image as the inputs describe it, before we look for it on disk."""

    id: int
    split: str
    names: list[str] = field(default_factory=list)  # candidate file names, most specific first
    captions: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Sample:
    """One image found on disk with its captions: the unit a shard is made of."""

    id: int
    split: str
    captions: tuple[str, ...]
    path: Path
    extension: str

    @property
    def key(self) -> str:
        return f"{self.id:012d}"

    def metadata(self) -> dict:
        return {
            "id": self.id,
            "captions": list(self.captions),
            "split": self.split,
            "file_name": self.path.name,
        }


# -------------------------------------------------------------------------------------------- reading inputs


def load_json(path: Path, what: str) -> Any:
    """Parse a json input, turning "no such file" and "not JSON" into messages that name the file."""
    if not path.is_file():
        raise ConversionError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise ConversionError(
            f"{path.name}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            f"expected a {what}"
        ) from None
    except UnicodeDecodeError:
        raise ConversionError(f"{path.name}: not valid JSON (not UTF-8 text); expected a {what}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_captions_file(path: Path) -> tuple[dict[int, str], list[tuple[int, int | None, str]]]:
    """``({image id: file name}, [(image id, annotation id, caption)] in file order)`` of a captions json.

    The shape is checked up front so that, say, an ``instances_*.json`` given by mistake is refused with a
    message instead of converting into shards without captions.
    """
    data = load_json(path, "COCO captions file")
    expected = f"{path.name}: expected a COCO captions file with 'images' and 'annotations' lists"
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ConversionError(expected)
    if not isinstance(data.get("annotations"), list):
        raise ConversionError(expected)
    names: dict[int, str] = {}
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not _is_int(image.get("id")):
            raise ConversionError(f"{expected}; images[{i}] has no integer 'id'")
        name = image.get("file_name")
        names.setdefault(image["id"], name if isinstance(name, str) and name else f"{image['id']:012d}.jpg")
    annotations = []
    for i, ann in enumerate(data["annotations"]):
        if (
            not isinstance(ann, dict)
            or not _is_int(ann.get("image_id"))
            or not isinstance(ann.get("caption"), str)
        ):
            raise ConversionError(
                f"{expected}; annotations[{i}] needs an integer 'image_id' and a string 'caption' "
                "(instances_*/person_keypoints_* files hold no captions)"
            )
        ann_id = ann.get("id")
        annotations.append((ann["image_id"], ann_id if _is_int(ann_id) else None, ann["caption"]))
    if not annotations:
        raise ConversionError(
            f"{path.name}: the 'annotations' list is empty; a COCO captions file has captions"
        )
    return names, annotations


@dataclass(frozen=True)
class KarpathyImage:
    split: str  # already mapped: restval -> train
    names: tuple[str, ...]  # "filepath/filename" and "filename"
    sentences: tuple[str, ...]


def read_karpathy_file(path: Path) -> dict[int, KarpathyImage]:
    """Karpathy's ``dataset_coco.json``: split, 2014 file name and raw sentences per COCO id."""
    data = load_json(path, "Karpathy split file")
    expected = (
        f"{path.name}: expected a Karpathy split file (dataset_coco.json) with an 'images' list of "
        "{'cocoid', 'filename', 'split', 'sentences'}"
    )
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not data["images"]:
        raise ConversionError(expected)
    out: dict[int, KarpathyImage] = {}
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not _is_int(image.get("cocoid")):
            raise ConversionError(f"{expected}; images[{i}] has no integer 'cocoid'")
        split = image.get("split")
        if split not in KARPATHY_SPLITS:
            raise ConversionError(
                f"{expected}; images[{i}] has split {split!r}, not one of {sorted(KARPATHY_SPLITS)}"
            )
        filename, filepath = image.get("filename"), image.get("filepath")
        names = []
        if isinstance(filename, str) and filename:
            if isinstance(filepath, str) and filepath:
                names.append(f"{filepath}/{filename}")
            names.append(filename)
        sentences = image.get("sentences", [])
        if not isinstance(sentences, list):
            raise ConversionError(f"{expected}; images[{i}] 'sentences' is not a list")
        raw = tuple(s["raw"] for s in sentences if isinstance(s, dict) and isinstance(s.get("raw"), str))
        out.setdefault(image["cocoid"], KarpathyImage(KARPATHY_SPLITS[split], tuple(names), raw))
    return out


def split_from_file_name(path: Path) -> str:
    """Without a Karpathy file the split is the captions file's: ``captions_val2017.json`` -> ``val``."""
    name = path.name.lower()
    if "train" in name:
        return "train"
    return "val" if "val" in name else "train"


def _clean(captions: Iterable[str]) -> list[str]:
    return [c.strip() for c in captions if c.strip()]


def collect_entries(
    captions_files: Sequence[Path], karpathy: Path | None, skipped: Counter[str]
) -> tuple[list[ImageEntry], int]:
    """Merge the captions files (and the Karpathy split) into one entry per image id.

    Returns the entries and the number of annotations read. Captions keep annotation order; an annotation id
    seen twice (the same image in a 2014 and a 2017 file) counts once.
    """
    entries: dict[int, ImageEntry] = {}
    seen_annotations: set[int] = set()
    n_annotations = 0
    for path in captions_files:
        names, annotations = read_captions_file(path)
        n_annotations += len(annotations)
        split = split_from_file_name(path)
        for image_id, name in names.items():
            entry = entries.setdefault(image_id, ImageEntry(image_id, split))
            if name not in entry.names:
                entry.names.append(name)
        for image_id, ann_id, caption in annotations:
            if ann_id is not None:
                if ann_id in seen_annotations:
                    continue
                seen_annotations.add(ann_id)
            entries.setdefault(image_id, ImageEntry(image_id, split)).captions.append(caption)
    if karpathy is not None:
        entries = _apply_karpathy(entries, read_karpathy_file(karpathy), skipped)
    for entry in entries.values():
        entry.captions = _clean(entry.captions)
        default = f"{entry.id:012d}.jpg"
        if default not in entry.names:
            entry.names.append(default)
    return sorted(entries.values(), key=lambda e: e.id), n_annotations


def _apply_karpathy(
    entries: dict[int, ImageEntry], karpathy: dict[int, KarpathyImage], skipped: Counter[str]
) -> dict[int, ImageEntry]:
    """The Karpathy file decides which images exist and their split; its sentences fill in absent captions."""
    out: dict[int, ImageEntry] = {}
    for image_id, k in karpathy.items():
        entry = entries.get(image_id) or ImageEntry(image_id, k.split)
        entry.split = k.split
        entry.names += [n for n in k.names if n not in entry.names]
        if not _clean(entry.captions):
            entry.captions = list(k.sentences)
        out[image_id] = entry
    skipped["not_in_karpathy"] += len(entries.keys() - karpathy.keys())
    return out


# -------------------------------------------------------------------------------------------- finding images


def index_images(images: Path) -> dict[str, Path]:
    """Every file in ``images`` and its immediate subfolders, by name and by ``subfolder/name``.

    One directory listing instead of a stat per image: COCO has 123k images, often on network storage.
    A name in ``images`` itself wins over the same name in a subfolder; subfolders are read in sorted order.
    """
    index: dict[str, Path] = {}
    subdirs = []
    with os.scandir(images) as it:
        for entry in sorted(it, key=lambda e: e.name):
            if entry.is_dir():
                subdirs.append(entry)
            elif entry.is_file():
                index.setdefault(entry.name, Path(entry.path))
    for sub in subdirs:
        with os.scandir(sub.path) as it:
            for entry in sorted(it, key=lambda e: e.name):
                if entry.is_file():
                    index.setdefault(f"{sub.name}/{entry.name}", Path(entry.path))
                    index.setdefault(entry.name, Path(entry.path))
    return index


def resolve_samples(
    entries: Sequence[ImageEntry], index: dict[str, Path], skipped: Counter[str]
) -> tuple[list[Sample], list[tuple[int, str]]]:
    """Entries whose image is on disk and that have captions, as samples; the rest counted by reason.

    Returns the samples (ordered by id) and the missing images as ``(id, expected file name)``.
    """
    samples: list[Sample] = []
    missing: list[tuple[int, str]] = []
    for entry in entries:
        if not entry.captions:
            skipped["no_captions"] += 1
            continue
        path = next((index[n] for n in entry.names if n in index), None)
        if path is None:
            skipped["missing_image"] += 1
            missing.append((entry.id, entry.names[0].rsplit("/", 1)[-1]))
            continue
        extension = IMAGE_EXTENSIONS.get(path.suffix.lower())
        if extension is None:
            skipped["unsupported_format"] += 1
            continue
        samples.append(Sample(entry.id, entry.split, tuple(entry.captions), path, extension))
    return samples, missing


# -------------------------------------------------------------------------------------------------- the plan


def plan_shards(samples: Sequence[Sample], shard_size: int) -> dict[str, list[tuple[str, list[Sample]]]]:
    """Per split, ``[(shard name, samples)]``: samples by id, cut every ``shard_size``."""
    by_split: dict[str, list[Sample]] = {}
    for sample in sorted(samples, key=lambda s: s.id):
        by_split.setdefault(sample.split, []).append(sample)
    order = [s for s in SPLIT_ORDER if s in by_split] + sorted(by_split.keys() - set(SPLIT_ORDER))
    return {
        split: [
            (f"{split}-{i // shard_size:06d}.tar", by_split[split][i : i + shard_size])
            for i in range(0, len(by_split[split]), shard_size)
        ]
        for split in order
    }


def fingerprint(samples: Sequence[Sample]) -> str:
    """A digest of what the shards will hold (ids, splits, captions, file names), not of the image bytes.

    A rerun keeps finished shards only when this matches, so shards made from other inputs never mix.
    """
    digest = hashlib.sha256()
    for sample in sorted(samples, key=lambda s: s.id):
        digest.update(json.dumps(sample.metadata(), ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:32]


def brace_pattern(split: str, n_shards: int) -> str:
    """``train-{000000..000113}.tar``: one string a data config can hold for the whole split."""
    return f"{split}-{{{0:06d}..{n_shards - 1:06d}}}.tar"


# -------------------------------------------------------------------------------------------- writing shards


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # fixed metadata: the same inputs give byte-identical shards, whenever and by whom they are made
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uname = info.gname = "coco"
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: Sequence[Sample], progress: tqdm) -> None:
    """Write one shard under a temporary name and rename it when complete, so a shard that exists is whole."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for sample in samples:
                    _add_member(tar, f"{sample.key}.{sample.extension}", sample.path.read_bytes())
                    meta = json.dumps(sample.metadata(), ensure_ascii=False).encode()
                    _add_member(tar, f"{sample.key}.json", meta)
                    progress.update(1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: Any) -> None:
    """Atomic: a reader (or a rerun) never sees half a manifest."""
    atomic_write_text(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def check_previous_run(out: Path, shard_size: int, digest: str) -> None:
    """Refuse to mix shards of another shard size or other inputs into ``out``: their files would collide."""
    manifest_path = out / "manifest.json"
    advice = f"use a new --out or delete {out}"
    if not manifest_path.exists():
        stray = sorted(p.name for p in out.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
        if stray:
            raise ConversionError(
                f"{out} already holds shards ({stray[0]}, ...) but no manifest.json; {advice}"
            )
        return
    try:
        previous = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConversionError(f"{manifest_path} from a previous run is not valid JSON; {advice}") from None
    if not isinstance(previous, dict):
        raise ConversionError(f"{manifest_path} is not a converter manifest; {advice}")
    if previous.get("shard_size") != shard_size:
        raise ConversionError(
            f"{out} holds shards of {previous.get('shard_size')} samples from a previous run "
            f"(manifest.json); this run asks for --shard-size {shard_size}; {advice}"
        )
    if previous.get("fingerprint") != digest:
        raise ConversionError(
            f"{out} holds shards made from other inputs (captions, split or images differ from "
            f"manifest.json's); {advice}"
        )


def discard_temporaries(out: Path) -> None:
    """A temporary file is a shard or report an interrupted run did not finish: never worth keeping."""
    for tmp in [
        *out.glob(f"*.tar{TMP_SUFFIX}"),
        *out.glob(f"*.json{TMP_SUFFIX}"),
        *out.glob(".*.json.*.tmp"),
    ]:
        log.info("discarding %s left by an interrupted run", tmp.name)
        tmp.unlink()


def build_manifest(
    plan: dict[str, list[tuple[str, list[Sample]]]],
    *,
    shard_size: int,
    digest: str,
    inputs: dict,
    skipped: Counter[str],
    missing: list[tuple[int, str]],
    complete: bool,
) -> dict:
    """The report: what each split holds and how to name its shards (a brace pattern that data configs and
    ``expand_shards`` take), what was skipped, and the shard size + fingerprint a rerun checks against."""
    splits = {
        split: {
            "shards": brace_pattern(split, len(shards)),
            "num_shards": len(shards),
            "samples": sum(len(s) for _, s in shards),
            "captions": sum(len(x.captions) for _, s in shards for x in s),
        }
        for split, shards in plan.items()
    }
    return {
        "format": FORMAT_VERSION,
        "complete": complete,
        "shard_size": shard_size,
        "fingerprint": digest,
        "inputs": inputs,
        "splits": splits,
        "skipped": {reason: skipped[reason] for reason in SKIP_REASONS},
        "missing_images": [image_id for image_id, _ in missing],
    }


# ---------------------------------------------------------------------------------------------- entry points


def _check_inputs(
    images: Path, captions: Sequence[Path], karpathy: Path | None, out: Path, shard_size: int
) -> None:
    if not captions:
        raise ConversionError("give at least one COCO captions file (--captions captions_train2017.json ...)")
    if shard_size < 1:
        raise ConversionError(f"--shard-size must be at least 1, not {shard_size}")
    if not images.is_dir():
        raise ConversionError(f"images folder not found: {images}")
    for path in captions:
        if not path.is_file():
            raise ConversionError(f"COCO captions file not found: {path}")
    if karpathy is not None and not karpathy.is_file():
        raise ConversionError(f"Karpathy split file not found: {karpathy}")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} is a file, not a folder")


def convert(
    images: Path,
    captions: list[Path],
    out: Path,
    karpathy: Path | None = None,
    shard_size: int = 1000,
    progress: bool = True,
) -> dict:
    """Convert COCO captions (+ images, + optional Karpathy split) to shards in ``out``; returns the manifest.

    Rerunnable: shards already finished by an earlier run with the same inputs are kept as they are.
    """
    images, out = Path(images), Path(out)
    captions = [Path(p) for p in captions]
    karpathy = Path(karpathy) if karpathy is not None else None
    _check_inputs(images, captions, karpathy, out, shard_size)

    skipped: Counter[str] = Counter()
    entries, n_annotations = collect_entries(captions, karpathy, skipped)
    samples, missing = resolve_samples(entries, index_images(images), skipped)
    log.info(
        "%d images, %d annotations read; %d images to convert", len(entries), n_annotations, len(samples)
    )
    if not samples:
        reasons = ", ".join(f"{k} {v}" for k, v in skipped.items() if v)
        example = f"; e.g. {missing[0][1]} is not in {images} or its subfolders" if missing else ""
        raise ConversionError(
            f"nothing to convert: {len(entries)} images listed, none usable (skipped: {reasons}){example}; "
            "--images should be the folder holding the images or their train2017/ val2017/ folders"
        )

    plan = plan_shards(samples, shard_size)
    digest = fingerprint(samples)
    inputs = {
        "images": str(images),
        "captions": [p.name for p in captions],
        "karpathy": karpathy.name if karpathy else None,
    }
    manifest_args = dict(
        shard_size=shard_size, digest=digest, inputs=inputs, skipped=skipped, missing=missing
    )
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out / ".lock")):
        check_previous_run(out, shard_size, digest)
        discard_temporaries(out)
        # written first, so a rerun after an interruption can tell whether the shards here are its own
        _write_json(out / "manifest.json", build_manifest(plan, complete=False, **manifest_args))
        written, kept = _write_shards(out, plan, progress)
        _write_json(out / "sizes.json", {name: len(s) for shards in plan.values() for name, s in shards})
        (out / "missing_images.txt").write_text("".join(f"{i}\t{name}\n" for i, name in missing))
        manifest = build_manifest(plan, complete=True, **manifest_args)
        _write_json(out / "manifest.json", manifest)
    log.info("%d shards written, %d kept from an earlier run, in %s", written, kept, out)
    return manifest


def _write_shards(
    out: Path, plan: dict[str, list[tuple[str, list[Sample]]]], progress: bool
) -> tuple[int, int]:
    total = sum(len(s) for shards in plan.values() for _, s in shards)
    written = kept = 0
    with tqdm(total=total, unit="img", desc="COCO -> shards", disable=not progress) as bar:
        for shards in plan.values():
            for name, samples in shards:
                if (out / name).is_file():
                    kept += 1
                    bar.update(len(samples))
                    continue
                write_shard(out / name, samples, bar)
                written += 1
    return written, kept


def summary(manifest: dict, out: Path) -> str:
    """What a person reads after a conversion: sizes per split, what was skipped, where the report is."""
    lines = [f"COCO shards in {out}:"]
    for split, s in manifest["splits"].items():
        shards = f"{s['num_shards']} shard{'s' if s['num_shards'] != 1 else ''} ({s['shards']})"
        lines.append(f"  {split}: {s['samples']} samples, {s['captions']} captions, {shards}")
    skipped = {k: v for k, v in manifest["skipped"].items() if v}
    lines.append("  skipped: " + (", ".join(f"{k} {v}" for k, v in skipped.items()) if skipped else "none"))
    if manifest["missing_images"]:
        lines.append(f"  missing images listed in {out / 'missing_images.txt'}")
    lines.append(f"  report: {out / 'manifest.json'} (shard sizes in {out / 'sizes.json'})")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m autoglm_train.data.coco",
        description="Convert COCO Captions (and the Karpathy split) into webdataset shards.",
    )
    parser.add_argument(
        "--images", type=Path, required=True, help="COCO images (or its train2017/ ... folders)"
    )
    parser.add_argument(
        "--captions",
        type=Path,
        nargs="+",
        required=True,
        help="captions_train2017.json [captions_val2017.json ...]",
    )
    parser.add_argument("--karpathy", type=Path, default=None, help="dataset_coco.json: train/val/test split")
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/coco")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        manifest = convert(
            args.images,
            args.captions,
            args.out,
            karpathy=args.karpathy,
            shard_size=args.shard_size,
            progress=not args.no_progress,
        )
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(manifest, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
