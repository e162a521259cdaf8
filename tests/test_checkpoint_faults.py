"""Checkpoints verified before use, kept in a short history, written whole or not at all; resumes that
change what a run was are refused (issue 28, points 2-4)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_config, train_run

from autoglm_train import evaluate, train
from autoglm_train.compress import run as compress_run
from autoglm_train.export_open_clip import export_checkpoint
from autoglm_train.resume_config import ResumeConfigError, check_resume_config
from autoglm_train.utils import checkpoint_files
from autoglm_train.utils.checkpoint_files import (
    DamagedCheckpointError,
    manifest_path,
    save_checkpoint_file,
    verify_checkpoint,
)
from autoglm_train.utils.files import DiskWriteError, atomic_write_text


def state(step: int) -> dict:
    return {"global_step": step, "w": torch.full((256,), float(step)), "config": {"seed": 0}}


def truncate(path: Path, keep: float = 0.5) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))


def test_a_truncated_altered_or_unfinished_checkpoint_is_refused_naming_why(tmp_path):
    path = tmp_path / "last.ckpt"
    manifest = save_checkpoint_file(state(3), path)
    assert manifest["step"] == 3 and manifest["size"] == path.stat().st_size
    assert manifest["config_digest"] == checkpoint_files.config_digest({"seed": 0})
    assert verify_checkpoint(path) == manifest
    good = path.read_bytes()

    truncate(path)
    with pytest.raises(DamagedCheckpointError, match="truncated"):
        verify_checkpoint(path)
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(DamagedCheckpointError, match="SHA-256"):
        verify_checkpoint(path)
    # no manifest (another tool's file, or one cut short before its manifest): the zip must be whole
    manifest_path(path).unlink()
    path.write_bytes(good)
    assert verify_checkpoint(path) is None
    truncate(path)
    with pytest.raises(DamagedCheckpointError, match="zip directory"):
        verify_checkpoint(path)


def test_last_versions_are_kept_newest_first_and_the_same_step_replaces(tmp_path):
    path = tmp_path / "last.ckpt"
    for step in (1, 2, 3, 4, 4):
        save_checkpoint_file(state(step), path, keep_last=3)
    steps = [verify_checkpoint(p)["step"] for p in checkpoint_files.history(path)]
    assert steps == [4, 3, 2]
    assert torch.load(tmp_path / "last-2.ckpt", weights_only=True)["w"][0] == 2
    save_checkpoint_file(state(9), tmp_path / "best.ckpt", keep_last=3)
    save_checkpoint_file(state(10), tmp_path / "best.ckpt", keep_last=3)
    assert not (tmp_path / "best-1.ckpt").exists()  # only the resume checkpoint keeps a history


def test_a_sharded_checkpoint_is_unfinished_until_its_manifest_and_keeps_its_previous_version(tmp_path):
    # what FSDP2Strategy.save_checkpoint does around the ranks' DCP writes (tests/test_fsdp.py runs it)
    folder = tmp_path / "checkpoints" / "last.ckpt"
    for step in (2, 4):
        checkpoint_files.begin_folder(folder, keep_last=2, step=step)
        with pytest.raises(DamagedCheckpointError, match="never finished"):
            verify_checkpoint(folder)  # a rank lost here leaves the folder marked
        for rank in (0, 1):
            (folder / f"__{rank}_0.distcp").write_bytes(bytes([step, rank]) * 100)
        (folder / ".metadata").write_bytes(b"the plan")
        checkpoint_files.write_folder_manifest(folder, step)
        assert verify_checkpoint(folder)["step"] == step
    previous = tmp_path / "checkpoints" / "last-1.ckpt"
    assert verify_checkpoint(previous)["step"] == 2
    truncate(folder / "__1_0.distcp")
    with pytest.raises(DamagedCheckpointError, match=r"__1_0\.distcp is truncated"):
        verify_checkpoint(folder)
    assert train.find_resume_checkpoint(tmp_path) == previous


def test_a_full_disk_while_saving_leaves_the_previous_checkpoint_and_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_checkpoint_file(state(1), path, keep_last=2)
    real_write = checkpoint_files._HashingWriter.write

    def disk_full_after_a_little(self, data):
        if self.size > 100:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(checkpoint_files._HashingWriter, "write", disk_full_after_a_little)
    with pytest.raises(DiskWriteError, match=r"could not write .*last\.ckpt: No space left.*GiB free") as exc:
        save_checkpoint_file(state(2), path, keep_last=2)
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(path)
    assert verify_checkpoint(path)["step"] == 1 and torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.manifest.json"]

    # metrics and export metadata go through the same atomic writer
    metrics = tmp_path / "metrics.json"
    metrics.write_text("{}")

    def no_space(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("autoglm_train.utils.files._write_new_file", no_space)
    with pytest.raises(DiskWriteError, match="metrics.json"):
        atomic_write_text(metrics, '{"val/r1_mean": 1}')
    assert metrics.read_text() == "{}"


def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, caplog):
    last = tmp_path / "checkpoints" / "last.ckpt"
    for step in (2, 4):
        save_checkpoint_file(state(step), last, keep_last=2)
    assert train.find_resume_checkpoint(tmp_path) == last
    truncate(last)
    with caplog.at_level(logging.WARNING):
        assert train.find_resume_checkpoint(tmp_path) == tmp_path / "checkpoints" / "last-1.ckpt"
    assert "skipped" in caplog.text and "truncated" in caplog.text and "falling back" in caplog.text
    truncate(tmp_path / "checkpoints" / "last-1.ckpt")
    with pytest.raises(DamagedCheckpointError, match="no good checkpoint"):
        train.find_resume_checkpoint(tmp_path)


# --- resuming with a changed config --------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_config(tmp_path_factory):
    return train.run_config(compose_config(TINY, tmp_path_factory.mktemp("cfg")))


def resumed(tmp_path, *overrides: str) -> dict:
    return train.run_config(compose_config([*TINY, *overrides], tmp_path))


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        (["model.embed_dim=32"], ["model.embed_dim: 64 -> 32"]),
        (["loss=siglip"], ["loss.weights.siglip: '<absent>' -> 1.0"]),
        (["seed=1"], ["seed: 0 -> 1"]),
        (["data.shuffle_buffer=100"], ["data.shuffle_buffer: 500 -> 100"]),
        (["data.batch_size=32"], ["data.batch_size: 64 -> 32", "the global batch", "was 64 and would be 32"]),
        (["optimizer.lr=0.1"], ["optimizer.lr"]),
    ],
)
def test_a_resume_that_changes_what_the_run_was_is_refused_key_by_key(
    saved_config, tmp_path, overrides, refused
):
    new = resumed(tmp_path, *overrides)
    with pytest.raises(ResumeConfigError) as exc:
        check_resume_config(saved_config, new)
    for text in refused:
        assert text in str(exc.value)
    assert "resume.allow_changes=[" in str(exc.value)
    # named, it is accepted (a key above it accepts it too)
    top = [
        key.split(".")[0] for key in str(exc.value).split("resume.allow_changes=[")[1].rstrip("]").split(",")
    ]
    assert check_resume_config(saved_config, new, top)


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.max_steps=99", "trainer.val_check_interval=7", "trainer.log_every_n_steps=1"],
        ["data.timeout=30", "logger=none", "eval.chunk_size=10", "checkpoint.keep_last=5", "threads=1"],
        # the same global batch over more ranks: the stream starts its epoch afresh (RunState), nothing else
        ["trainer=ddp_cpu", "data.batch_size=32"],
    ],
)
def test_a_resume_that_changes_only_how_it_runs_is_allowed(saved_config, tmp_path, overrides):
    accepted = check_resume_config(saved_config, resumed(tmp_path, *overrides))
    assert accepted and all("->" in line for line in accepted)


# --- the four readers on a real run ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory, shapes_dir):
    """A tiny run (steps 2 and 4 kept), whose newest checkpoint is then cut in half."""
    os.environ["AUTOGLM_DATA_DIR"] = str(shapes_dir)
    run = tmp_path_factory.mktemp("damaged") / "run"
    overrides = [*TINY, "trainer.max_steps=4", "trainer.val_check_interval=2", "eval.zeroshot.task=null"]
    train_run(overrides, run)
    truncate(run / "checkpoints" / "last.ckpt")
    yield run, overrides
    os.environ.pop("AUTOGLM_DATA_DIR", None)


@pytest.mark.slow
def test_every_reader_refuses_a_truncated_checkpoint_and_resume_falls_back(damaged_run, tmp_path):
    run, overrides = damaged_run
    last = run / "checkpoints" / "last.ckpt"
    with pytest.raises(DamagedCheckpointError, match="truncated"):
        evaluate.run(compose_config([f"ckpt={last}", "progress_bar=false"], tmp_path / "eval", "evaluate"))
    with pytest.raises(DamagedCheckpointError, match="truncated"):
        compress_run.run(compose_config([f"ckpt={last}"], tmp_path / "compress", "compress"))
    with pytest.raises(DamagedCheckpointError, match="truncated"):
        export_checkpoint(last, tmp_path / "open_clip.pt")
    with pytest.raises(
        DamagedCheckpointError, match=r"truncated.*newest good version beside it: .*last-1\.ckpt"
    ):
        train.run(compose_config([*overrides, f"ckpt_path={last}"], tmp_path / "resume"))

    # a requeued job in its own run directory resumes from the kept step-2 checkpoint and goes on
    requeued = tmp_path / "requeued"
    shutil.copytree(run, requeued)
    metrics = train.run(compose_config([*overrides, "trainer.max_steps=6"], requeued))
    assert metrics["train/steps"] == 6
    assert verify_checkpoint(requeued / "checkpoints" / "last.ckpt")["step"] == 6


@pytest.mark.slow
def test_a_full_disk_at_checkpoint_time_stops_the_run_naming_the_path(shapes_dir, tmp_path, monkeypatch):
    os.environ["AUTOGLM_DATA_DIR"] = str(shapes_dir)
    real_save = torch.save

    def disk_full_at_step_4(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("global_step") == 4:
            f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_4)
    cfg = compose_config([*TINY, "trainer.max_steps=4", "trainer.val_check_interval=2"], tmp_path / "run")
    try:
        with pytest.raises(DiskWriteError, match=r"could not write .*\.ckpt: No space left on device"):
            train.run(cfg)
    finally:
        os.environ.pop("AUTOGLM_DATA_DIR", None)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert verify_checkpoint(last)["step"] == 2
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(last, weights_only=True)["global_step"] == 2
