"""Bad data does not stop training: each kind is skipped, counted into metrics.json and named in a warning."""

import io
import json
import logging
from pathlib import Path

import lightning as L
import pytest
import webdataset as wds
from conftest import TINY, compose_config
from omegaconf import open_dict
from PIL import Image

from autoglm_train import train

pytestmark = pytest.mark.slow
BATCH, GOOD_PER_SHARD, GOOD_SHARDS = 4, 12, 3


def jpeg(k: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (k * 40 % 256, 90, 200 - k * 7 % 200)).save(out, format="JPEG")
    return out.getvalue()


def caption(k: int) -> bytes:
    return json.dumps({"captions": [f"a picture number {k}", f"image {k} again"]}).encode()


def write_shard(path: Path, first: int, good: int, bad: dict | None = None) -> None:
    with wds.TarWriter(str(path)) as sink:
        for k in range(first, first + good):
            sink.write({"__key__": f"s{k:05d}", "jpg": jpeg(k), "json": caption(k)})
        if bad:
            sink.write({"__key__": f"bad{first:05d}", **bad})


class VanishingShard(L.Callback):
    """Deletes a shard after the start-up checks and before the stream opens it.

    Not later: Lightning starts iterating before ``on_train_start``, and the stream reads a chunk of
    samples ahead, so by then every shard of this small set is already open (and readable after unlink)."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_fit_start(self, trainer, pl_module):
        self.path.unlink()


def test_each_kind_of_bad_data_is_skipped_counted_and_training_completes(tmp_path, caplog):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(GOOD_SHARDS):
        write_shard(shards / f"train-{i:06d}.tar", i * 100, GOOD_PER_SHARD)
    # one bad sample each, among good ones
    write_shard(
        shards / "train-000003.tar", 300, 4, {"jpg": jpeg(0)[:200], "json": caption(0)}
    )  # corrupt jpeg
    write_shard(
        shards / "train-000004.tar", 400, 4, {"jpg": jpeg(1), "json": b'{"captions": [" "]}'}
    )  # empty
    write_shard(
        shards / "train-000005.tar", 500, 4, {"jpg": jpeg(2), "txt": b"caf\xe9 \xff\xfe"}
    )  # not UTF-8
    # a tar cut off inside its only sample, and a shard that vanishes after the run has started
    write_shard(shards / "train-000006.tar", 600, 1)
    data = (shards / "train-000006.tar").read_bytes()
    (shards / "train-000006.tar").write_bytes(data[:700])
    write_shard(shards / "train-000007.tar", 700, 4)
    write_shard(shards / "val-000000.tar", 900, 20)
    good = GOOD_SHARDS * GOOD_PER_SHARD + 3 * 4  # what a full pass can use (the vanished shard's 4 excluded)
    assert good % BATCH == 0

    cfg = compose_config(
        [
            *[o for o in TINY if not o.startswith("data.prepare")],
            "data=wds",
            f"data.train_shards='{shards}/train-{{000000..000007}}.tar'",
            f"data.val_shards={shards}/val-000000.tar",
            f"data.batch_size={BATCH}",
            "data.eval_batch_size=10",
            "data.num_workers=0",
            "data.image_size=32",
            "data.shuffle_buffer=10",
            "tokenizer.vocab_size=200",
            "tokenizer.min_frequency=1",
            f"trainer.max_steps={good // BATCH}",  # exactly one pass, so every bad item is met once
            "trainer.val_check_interval=100",
            "callbacks=none",
        ],
        tmp_path / "run",
    )
    with open_dict(cfg):
        cfg.callbacks = {
            "vanish": {"_target_": f"{__name__}.VanishingShard", "path": f"{shards}/train-000007.tar"}
        }
    with caplog.at_level(logging.WARNING, logger="autoglm_train.data.shards"):
        metrics = train.run(cfg)

    assert metrics["train/steps"] == good // BATCH
    assert metrics["data/skipped_bad_image"] == 1
    assert metrics["data/skipped_missing_caption"] == 1
    assert metrics["data/skipped_bad_caption"] == 1
    assert metrics["data/skipped_tar_error"] == 2  # the truncated tar and the vanished shard
    assert metrics["data/skipped"] == 5
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["data/skipped_tar_error"] == 2
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    for name in ("train-000003.tar", "train-000006.tar", "train-000007.tar"):
        assert name in warnings, name
