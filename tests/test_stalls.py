"""A shard that never delivers stops the run within data.timeout, with an error naming it, and leaves no
process of its pipe: command behind."""

import gc
import io
import json
import random
import re
import time
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from autoglm_train.data.shards import ShardStallError, ShardWatch, stall_message
from autoglm_train.lit.datamodule import ShardDataModule

TIMEOUT = 2
DATA_CONFIG = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear"}


def tokenize(captions: list[str]) -> torch.Tensor:
    # module level, so spawned workers can unpickle it; never reached before the stall
    return torch.ones(len(captions), 8, dtype=torch.long)


def write_shard(path: Path) -> str:
    image = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image, format="PNG")
    caption = json.dumps({"captions": ["a red square"]})
    with wds.TarWriter(str(path)) as sink:
        for k in range(4):
            sink.write({"__key__": f"s{k}", "png": image.getvalue(), "json": caption})
    return str(path)


def stalling_url(shard: str) -> tuple[str, str]:
    """A pipe: shard that sleeps before it delivers, and the sleep's argument, unique to this test run so
    its process can be looked for."""
    seconds = f"{25 + random.random():.6f}"
    return f"pipe:sleep {seconds}; cat {shard}", seconds


def running_with(argument: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if argument.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def datamodule(train: list[str], val: list[str], **kwargs) -> ShardDataModule:
    dm = ShardDataModule(train, val, batch_size=2, eval_batch_size=2, num_workers=1, image_size=32, **kwargs)
    dm.attach(tokenize, DATA_CONFIG)
    return dm


@pytest.fixture
def clock_from_shard_opened(monkeypatch) -> dict:
    """The loader's timeout clock starts at its first wait for a batch; on a loaded machine a worker may
    not have opened its shard by then. So the first wait begins only once worker 0 has opened it (an
    event, not a stretch of wall clock), and the test's clock starts there too."""
    started: dict = {}
    watch = ShardWatch.watch

    def watch_once_opened(self, batches, timeout):
        deadline = time.monotonic() + 300
        while 0 not in self.reading():
            assert time.monotonic() < deadline, "the worker never opened its shard"
            time.sleep(0.05)
        started["at"] = time.monotonic()
        yield from watch(self, batches, timeout)

    monkeypatch.setattr(ShardWatch, "watch", watch_once_opened)
    return started


def assert_stall_named_and_cleaned_up(
    first_batch, url: str, sleep_argument: str, within: float, started: dict
) -> None:
    with pytest.raises(ShardStallError) as info:
        first_batch()
    took = time.monotonic() - started["at"]
    message = str(info.value)
    assert f"worker 0 was reading {url}" in message and f"in {TIMEOUT} s (data.timeout)" in message
    assert took < within, f"stall reported after {took:.1f} s"
    del info
    gc.collect()
    deadline = time.monotonic() + 5
    while running_with(sleep_argument) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running_with(sleep_argument), "the stalled pipe's processes outlived the loader"


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_stalled_pipe_shard_is_named_within_the_timeout_and_its_processes_end(
    tmp_path, split, clock_from_shard_opened
):
    good = write_shard(tmp_path / "good.tar")
    url, sleep_argument = stalling_url(good)
    if split == "train":
        dm = datamodule([url], [good], timeout=TIMEOUT)
        batches = dm.train_dataloader()  # the replayable training stream
    else:
        dm = datamodule([good], [url], timeout=TIMEOUT)
        batches = dm.val_dataloader()
    assert_stall_named_and_cleaned_up(
        lambda: next(iter(batches)), url, sleep_argument, TIMEOUT + 8, clock_from_shard_opened
    )


@pytest.mark.slow
def test_a_stall_is_named_with_spawned_workers(tmp_path):
    # spawned workers get the watch by pickling: they must write where the training process looks
    good = write_shard(tmp_path / "good.tar")
    url, sleep_argument = stalling_url(good)
    loader = datamodule([url], [good], timeout=TIMEOUT)._loader(train=True)
    loader.multiprocessing_context = "spawn"
    # a spawned worker imports torch before it reads anything, slowly on a loaded machine: the test's clock
    # starts when the worker has opened the shard (an event), not when the loader started it
    batches = iter(loader)  # starts the workers; the loader's own clock starts at the first next()
    deadline = time.monotonic() + 300
    while 0 not in loader.shard_watch.reading():
        assert time.monotonic() < deadline, "the spawned worker never opened its shard"
        time.sleep(0.1)
    start = time.monotonic()
    with pytest.raises(ShardStallError, match=re.escape(f"worker 0 was reading {url}")) as info:
        next(batches)
    assert time.monotonic() - start < TIMEOUT + 10
    del info
    gc.collect()
    time.sleep(1)
    assert not running_with(sleep_argument)


def test_a_healthy_loader_with_a_timeout_reads_every_batch(tmp_path):
    shards = [write_shard(tmp_path / f"s{i}.tar") for i in range(2)]
    dm = datamodule(shards, shards, timeout=TIMEOUT)
    assert sum(b["image"].shape[0] for b in dm.val_dataloader()) == 8
    assert sum(b["image"].shape[0] for b in dm.train_dataloader()) == 8


def test_without_timeout_or_workers_nothing_is_watched(tmp_path):
    good = write_shard(tmp_path / "good.tar")
    for kwargs in ({"timeout": 0}, {"timeout": None}, {"timeout": TIMEOUT, "num_workers": 0}):
        dm = ShardDataModule([good], [good], batch_size=2, image_size=32, **{"num_workers": 1, **kwargs})
        dm.attach(tokenize, DATA_CONFIG)
        loader = dm._loader(train=False)
        assert loader.timeout == 0 and loader.shard_watch is None


def test_the_message_puts_the_awaited_worker_first():
    reading = {0: {"url": "a.tar", "pid": 1}, 1: {"url": "pipe:curl b", "pid": 2}}
    message = stall_message(600, reading, awaited=1)
    assert message.startswith("no batch from the data loader in 600 s (data.timeout); worker 1 was reading")
    assert "worker 0 was reading a.tar" in message and "0 or null waits forever" in message
    assert "worker 2 had not opened a shard yet" in stall_message(600, reading, awaited=2)
    assert "no worker had opened a shard yet" in stall_message(600, {}, awaited=None)


def test_the_watch_folder_goes_with_the_watch():
    watch = ShardWatch()
    folder = Path(watch.folder)
    assert folder.is_dir()
    del watch
    gc.collect()
    assert not folder.exists()
