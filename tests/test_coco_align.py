"""`experiment=coco_align` end to end on a generated COCO fixture: converter -> shards -> training ->
the 5-caption retrieval protocol on the Karpathy test split."""

import pytest
from coco_fixture import make_coco_fixture
from conftest import compose_config

from autoglm_train import train
from autoglm_train.data.coco import convert

pytestmark = pytest.mark.slow

# the coco_align experiment with its towers shrunk to run in seconds on a CPU
TINY_COCO = [
    "experiment=coco_align",
    "model=small",
    "model.embed_dim=32",
    "model.text_tower.width=32",
    "model.text_tower.depth=1",
    "model.text_tower.heads=2",
    "trainer=cpu",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.gradient_clip_val=1.0",
    "data.batch_size=4",
    "data.eval_batch_size=5",
    "data.num_workers=0",
    "data.image_size=32",
    "data.shuffle_buffer=10",
    "tokenizer.vocab_size=300",
    "tokenizer.min_frequency=1",
    "scheduler.warmup_steps=2",
    "logger=none",
    "progress_bar=false",
]


def test_coco_align_trains_on_converted_shards_and_reports_the_five_caption_protocol(tmp_path, monkeypatch):
    fixture = make_coco_fixture(tmp_path / "download", n_images=40, n_test=10, n_val=4)
    convert(
        fixture["images"],
        fixture["captions_files"],
        tmp_path / "data" / "coco",
        karpathy=fixture["karpathy"],
        shard_size=8,
        progress=False,
    )
    monkeypatch.setenv("AUTOGLM_DATA_DIR", str(tmp_path / "data"))
    metrics = train.run(compose_config(TINY_COCO, tmp_path / "run"))
    # every test image once, all five captions of each, both directions at R@1/5/10
    assert metrics["val/images"] == 10 and metrics["val/captions"] == 50
    for direction in ("i2t", "t2i"):
        for k in (1, 5, 10):
            assert 0.0 <= metrics[f"val/{direction}_r{k}"] <= 1.0
    # a gallery of 10 images: text->image R@10 is exactly 1 (image->text ranks 50 captions)
    assert metrics["val/t2i_r10"] == 1.0
    assert metrics["train/steps"] == 6 and metrics["data/skipped"] == 0
