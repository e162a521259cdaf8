"""Checkpoints that are whole, verified before use, and kept in a short history.

A checkpoint cut short (a full disk, a copy that stopped halfway, a node lost mid-write) used to be found
at resume as an unpickling error, with an older good checkpoint sitting beside it. So:

- a checkpoint file is written beside its final name, hashed while written, and renamed into place; a
  failed write leaves the previous file as it was and raises a ``DiskWriteError`` naming the path and the
  free space (``utils/files.py``);
- a small manifest (size, SHA-256, step, config digest) is written last, beside it:
  ``last.ckpt.manifest.json``, or ``manifest.json`` inside a sharded checkpoint's folder (every file);
- readers verify the manifest first and refuse a damaged checkpoint naming what is wrong
  (``DamagedCheckpointError``); a checkpoint without a manifest (older runs, other tools) is checked for
  a complete zip directory only;
- replacing ``last.ckpt`` keeps the ``keep_last - 1`` previous ones as ``last-1.ckpt``, ``last-2.ckpt``
  (newest first), so resume has a good one to fall back to.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autoglm_train.utils.files import atomic_write_json, written_beside

MANIFEST_SUFFIX = ".manifest.json"
FOLDER_MANIFEST = "manifest.json"
# in a sharded checkpoint's folder while its ranks write it: a folder holding it was never finished
FOLDER_WRITING = ".writing"
CHUNK = 1 << 22
# files whose previous versions are kept (the resume checkpoint); best.ckpt and exports are replaced
KEPT_NAMES = ("last.ckpt",)


class DamagedCheckpointError(ValueError):
    """A checkpoint that does not match what was written (or cannot be whole): the message says why."""


def manifest_path(path: str | Path) -> Path:
    path = Path(path)
    return path / FOLDER_MANIFEST if path.is_dir() else path.with_name(path.name + MANIFEST_SUFFIX)


def config_digest(config: Any) -> str | None:
    """A short digest of a run's config as saved in its checkpoint (None without one)."""
    if config is None:
        return None
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _HashingWriter:
    """A binary file that hashes what passes through it, so the checksum costs no second read."""

    def __init__(self, f) -> None:
        self.f, self.size, self.sha = f, 0, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def file_digest(path: Path) -> tuple[int, str]:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def history_path(path: Path, i: int) -> Path:
    """The ``i``-th previous version of ``path``: ``last.ckpt`` -> ``last-1.ckpt``."""
    return path if i == 0 else path.with_name(f"{path.stem}-{i}{path.suffix}")


def history(path: str | Path) -> list[Path]:
    """``path`` and its kept previous versions that exist, newest first."""
    path = Path(path)
    found = [path] if path.exists() else []
    i = 1
    while history_path(path, i).exists():  # rotation keeps them contiguous: the first gap ends them
        found.append(history_path(path, i))
        i += 1
    return found


def _move(src: Path, dst: Path) -> None:
    """Rename a checkpoint (a file with its manifest beside it, or a folder holding its own) over ``dst``."""
    if dst.is_dir():
        shutil.rmtree(dst)
    is_file = src.is_file()
    os.replace(src, dst)
    if is_file:
        if manifest_path(src).exists():
            os.replace(manifest_path(src), manifest_path(dst))
        else:
            manifest_path(dst).unlink(missing_ok=True)


def rotate(path: Path, keep_last: int) -> None:
    """Shift ``path`` and its previous versions one place older, dropping the oldest beyond ``keep_last``."""
    for i in range(keep_last - 1, 0, -1):
        if history_path(path, i - 1).exists():
            _move(history_path(path, i - 1), history_path(path, i))


def keep_count(path: Path, keep_last: int) -> int:
    return keep_last if path.name in KEPT_NAMES else 1


def saved_step(path: Path) -> int | None:
    try:
        return json.loads(manifest_path(path).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None


def save_checkpoint_file(checkpoint: dict, path: str | Path, keep_last: int = 1) -> dict:
    """Write ``checkpoint`` (torch.save) to ``path`` whole or not at all, then its manifest. Returns the
    manifest. The previous file becomes ``<stem>-1`` when it is one that is kept (``KEPT_NAMES``)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_beside(path) as tmp:
        with open(tmp, "xb") as f:
            writer = _HashingWriter(f)
            torch.save(checkpoint, writer)
            f.flush()
            os.fsync(f.fileno())
        manifest = {
            "file": path.name,
            "size": writer.size,
            "sha256": writer.sha.hexdigest(),
            "step": checkpoint.get("global_step"),
            "config_digest": config_digest(checkpoint.get("config")),
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if saved_step(path) != manifest["step"]:  # the same step saved again (after fit) replaces it
            rotate(path, keep_count(path, keep_last))
        os.replace(tmp, path)
        manifest_path(path).unlink(missing_ok=True)  # a stale one would call the new file damaged
        atomic_write_json(manifest_path(path), manifest, indent=2)  # last: its presence means "whole"
    _verified.pop(str(path), None)
    return manifest


def begin_folder(folder: str | Path, keep_last: int, step: int | None) -> None:
    """Before the ranks write a sharded checkpoint (one rank calls this): the previous versions shift one
    place older (as for a file), and the new folder is marked unfinished until its manifest is written."""
    folder = Path(folder)
    if folder.is_dir() and saved_step(folder) != step:
        rotate(folder, keep_count(folder, keep_last))
    elif folder.is_dir():  # the same step again: rewritten in place
        manifest_path(folder).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FOLDER_WRITING).touch()


def write_folder_manifest(folder: str | Path, step: int | None, config: Any = None) -> dict:
    """The manifest of a sharded checkpoint (every file the ranks wrote), written last, by one rank once
    all are done; it clears the unfinished mark."""
    folder = Path(folder)
    files = {}
    skip = (FOLDER_MANIFEST, FOLDER_WRITING)
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in skip):
        size, sha = file_digest(f)
        files[str(f.relative_to(folder))] = {"size": size, "sha256": sha}
    manifest = {
        "files": files,
        "step": step,
        "config_digest": config_digest(config),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(folder / FOLDER_MANIFEST, manifest, indent=2)
    (folder / FOLDER_WRITING).unlink(missing_ok=True)
    _verified.pop(str(folder), None)
    return manifest


# path -> (size, mtime) of what was verified and its manifest: a resume reads one checkpoint three times
_verified: dict[str, tuple[tuple, dict | None]] = {}


def _stamp(path: Path) -> tuple:
    # a folder's own mtime does not change when a file in it is rewritten or cut: stamp every file
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    mp = manifest_path(path)
    if not path.is_dir() and mp.exists():
        files.append(mp)
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def verify_checkpoint(path: str | Path) -> dict | None:
    """The manifest of the checkpoint at ``path`` once its files match it (None when it has none and its
    zip directory is whole); ``DamagedCheckpointError`` naming what differs otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    stamp = _stamp(path)
    cached = _verified.get(str(path))
    if cached and cached[0] == stamp:
        return cached[1]
    if (path / FOLDER_WRITING).exists():
        raise DamagedCheckpointError(
            f"{path} was never finished: its ranks did not all write their shards (a rank lost mid-save?)"
        )
    manifest = _read_manifest(path)
    if manifest is None:
        _check_without_manifest(path)
    elif path.is_dir():
        for name, want in manifest["files"].items():
            _check_file(path / name, want["size"], want["sha256"], f"{path}: {name}")
    else:
        _check_file(path, manifest["size"], manifest["sha256"], str(path))
    _verified[str(path)] = (stamp, manifest)
    return manifest


def _read_manifest(path: Path) -> dict | None:
    mp = manifest_path(path)
    if not mp.exists():
        return None
    try:
        manifest = json.loads(mp.read_text())
        if path.is_dir():
            assert isinstance(manifest["files"], dict)
        else:
            int(manifest["size"]), str(manifest["sha256"])
        return manifest
    except Exception as exc:
        raise DamagedCheckpointError(f"{path}: its manifest {mp.name} is unreadable ({exc})") from exc


def _check_file(path: Path, size: int, sha256: str, what: str) -> None:
    if not path.is_file():
        raise DamagedCheckpointError(f"{what} is missing (the manifest lists it)")
    actual = path.stat().st_size
    if actual < size:
        raise DamagedCheckpointError(
            f"{what} is truncated: {actual:,} of the {size:,} bytes written (a full disk or an "
            "interrupted copy)"
        )
    if actual > size:
        raise DamagedCheckpointError(f"{what} is {actual:,} bytes, {size:,} were written (altered)")
    if file_digest(path)[1] != sha256:
        raise DamagedCheckpointError(
            f"{what}: its SHA-256 differs from the one written (corrupted on disk or in a copy)"
        )


def _check_without_manifest(path: Path) -> None:
    # torch writes zip files; a truncated one has lost its central directory (at the end)
    if path.is_dir() or path.suffix != ".ckpt":
        return
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise DamagedCheckpointError(
            f"{path} is not a whole checkpoint (no manifest, and its zip directory is unreadable: {exc}); "
            "truncated by a full disk or an interrupted copy?"
        ) from exc


def newest_good(
    candidates: list[Path], verify: Callable[[Path], dict | None] = verify_checkpoint
) -> tuple[Path | None, dict | None, list[tuple[Path, str]]]:
    """The first of ``candidates`` (newest first) that verifies, its manifest, and those skipped with why."""
    skipped = []
    for candidate in candidates:
        try:
            return candidate, verify(candidate), skipped
        except DamagedCheckpointError as exc:
            skipped.append((candidate, str(exc)))
    return None, None, skipped
