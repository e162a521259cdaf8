import io
import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import shapes_set
from PIL import Image

from autoglm_train.data.shapes import generate, write_shapes_shards
from autoglm_train.data.shards import (
    NoUsableSamplesError,
    build_pipeline,
    expand_shards,
    first_usable_sample,
    iter_captions,
)
from autoglm_train.data.tokenizer import train_bpe
from autoglm_train.lit.datamodule import ShardDataModule


def to_tensor(img):
    return torch.from_numpy(__import__("numpy").asarray(img, dtype="float32")).permute(2, 0, 1) / 255


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(
        (c for s in generate(300, 0, "train", False, 16) for c in json.loads(s["json"])["captions"]), 200, 32
    )


def test_shapes_are_deterministic_and_held_out_captions_unique(tmp_path):
    a = list(generate(50, seed=3, split="val", unique_captions=True, image_size=32))
    b = list(generate(50, seed=3, split="val", unique_captions=True, image_size=32))
    assert [s["png"] for s in a] == [s["png"] for s in b]
    captions = [c for s in a for c in json.loads(s["json"])["captions"]]
    assert len(captions) == len(set(captions)) == 100
    assert "at the" in captions[0] and captions[0].startswith("a ")


SMALL_SPEC = {
    "n_train": 120,
    "n_val": 40,
    "image_size": 16,
    "samples_per_shard": 50,
    "val_shards": 2,
    "n_val_binding": 0,
}


def mtimes(shards: dict[str, list[str]]) -> dict[str, int]:
    return {p: Path(p).stat().st_mtime_ns for paths in shards.values() for p in paths}


def sample_count(shards: list[str]) -> int:
    return sum(1 for _ in wds.WebDataset(shards, shardshuffle=False, empty_check=False))


def test_shapes_written_once_and_reused(tmp_path):
    out = tmp_path / "shapes"
    made = write_shapes_shards(out, **SMALL_SPEC)
    assert len(made["train"]) == 3 and len(made["val"]) == 2
    stamp = mtimes(made)
    assert write_shapes_shards(out, **SMALL_SPEC) == made
    assert mtimes(made) == stamp


def test_another_spec_is_written_beside_and_the_first_set_stays_readable(tmp_path):
    out = tmp_path / "shapes"
    first = write_shapes_shards(out, **SMALL_SPEC)
    stamp = mtimes(first)
    second = write_shapes_shards(out, **(SMALL_SPEC | {"n_train": 60}))
    assert len(second["train"]) == 2 and not set(mtimes(second)) & set(stamp)
    # a run still reading the first set finds every shard of it, untouched, and whole
    assert mtimes(first) == stamp
    assert sample_count(first["train"]) == 120 and sample_count(second["train"]) == 60
    assert write_shapes_shards(out, **SMALL_SPEC) == first and mtimes(first) == stamp


@pytest.mark.parametrize("damage", ["truncated", "not json", "missing shard"])
def test_a_damaged_set_is_regenerated(tmp_path, damage):
    out = tmp_path / "shapes"
    made = write_shapes_shards(out, **SMALL_SPEC)
    manifest = Path(made["train"][0]).parent / "manifest.json"
    if damage == "truncated":
        manifest.write_text(manifest.read_text()[:40])
    elif damage == "not json":
        manifest.write_text("[]")
    else:
        Path(made["val"][1]).unlink()
    assert write_shapes_shards(out, **SMALL_SPEC) == made
    assert json.loads(manifest.read_text())["sizes"] == {"train": 120, "val": 40}
    assert sample_count(made["train"]) == 120 and sample_count(made["val"]) == 40
    assert not list(manifest.parent.glob(".staging-*"))


def test_train_and_eval_batches(shapes_dir, tokenizer):
    shards = sorted(str(p) for p in shapes_set(shapes_dir).glob("val-*.tar"))
    train = iter(build_pipeline(shards, tokenizer=tokenizer, transform=to_tensor, batch_size=16, train=True))
    batch = next(train)
    assert batch["image"].shape == (16, 3, 32, 32) and batch["text"].shape == (16, 32)
    assert batch["id"].dtype == torch.int64 and batch["skipped"] == {}
    evaluation = list(
        build_pipeline(shards, tokenizer=tokenizer, transform=to_tensor, batch_size=64, train=False)
    )
    # 200 held-out images + 50 in binding groups; partial last batch kept
    assert sum(b["image"].shape[0] for b in evaluation) == 250
    assert sum(b["text"].shape[0] for b in evaluation) == 500  # two captions per image, all used
    ids = torch.cat([b["id"] for b in evaluation])
    assert set(torch.cat([b["text_id"] for b in evaluation]).tolist()) == set(ids.tolist())


def write_bad_shard(path, good: int):
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(png, format="PNG")
    png = png.getvalue()
    caption = json.dumps({"captions": ["a red square"]}).encode()
    with wds.TarWriter(str(path)) as sink:
        for i in range(good):
            sink.write({"__key__": f"good{i}", "png": png, "json": caption})
        sink.write({"__key__": "truncated", "png": png[: len(png) // 2], "json": caption})
        sink.write({"__key__": "garbage", "jpg": b"not an image at all", "json": caption})
        sink.write({"__key__": "nocaption", "png": png, "json": json.dumps({"captions": []}).encode()})
        sink.write({"__key__": "noimage", "json": caption})


@pytest.mark.parametrize("good", [5, 4])  # 4: the bad samples come after the last (full) batch
def test_bad_samples_are_skipped_and_counted(tmp_path, tokenizer, good):
    write_bad_shard(tmp_path / "bad.tar", good=good)
    batches = list(
        build_pipeline(
            str(tmp_path / "bad.tar"), tokenizer=tokenizer, transform=to_tensor, batch_size=2, train=False
        )
    )
    assert sum(b["image"].shape[0] for b in batches) == good
    skipped = {}
    for b in batches:
        for k, v in b["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    assert skipped == {"bad_image": 3, "missing_caption": 1}


def test_no_usable_sample_is_an_error_naming_the_shards(tmp_path):
    write_bad_shard(tmp_path / "allbad.tar", good=0)
    with pytest.raises(NoUsableSamplesError, match="allbad.tar") as err:
        first_usable_sample(str(tmp_path / "allbad.tar"))
    assert "bad_image" in str(err.value)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        first_usable_sample(str(tmp_path / "nothere-{000..002}.tar"))


def test_datamodule_fails_fast_with_hint_when_shards_are_missing(tmp_path):
    dm = ShardDataModule(
        str(tmp_path / "t-{0..3}.tar"), str(tmp_path / "v.tar"), missing_hint="Make them with X."
    )
    with pytest.raises(
        FileNotFoundError, match=r"data.train_shards: 4 of 4 shards are missing.*Make them with X"
    ):
        dm.prepare_data()


def test_caption_iterator_reads_only_captions(shapes_dir):
    captions = list(iter_captions(str(shapes_set(shapes_dir) / "val-000000.tar"), limit=10))
    assert len(captions) == 20 and all(isinstance(c, str) for c in captions)


def test_globs_expand_sorted_and_sizes_give_the_epoch_length(tmp_path):
    from autoglm_train.data.shards import epoch_samples_from_sizes

    for i in (2, 0, 1):
        (tmp_path / f"train-{i:06d}.tar").write_bytes(b"")
    (tmp_path / "train-000003.tar.tmp").write_bytes(b"")  # an unfinished shard is not part of the set
    urls = expand_shards(str(tmp_path / "train-*.tar"))
    assert [Path(u).name for u in urls] == [f"train-{i:06d}.tar" for i in range(3)]
    assert expand_shards(str(tmp_path / "none-*.tar")) == [str(tmp_path / "none-*.tar")]  # reads as missing
    assert epoch_samples_from_sizes(urls) is None
    sizes = {f"train-{i:06d}.tar": 10 + i for i in range(3)}
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    assert epoch_samples_from_sizes(urls) == 33


@pytest.mark.parametrize("trim", [False, True])
def test_batches_drop_all_padding_token_columns_when_asked(shapes_dir, trim):
    captions = (c for s in generate(300, 0, "train", False, 16) for c in json.loads(s["json"])["captions"])
    tokenizer = train_bpe(captions, 1000, 77)  # CLIP's context: captions of ~20 tokens leave padding
    shards = str(shapes_set(shapes_dir) / "train-000000.tar")
    dm = ShardDataModule(shards, shards, batch_size=50, num_workers=0, image_size=32)
    dm.attach(tokenizer, {"mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear"}, trim_text=trim)
    for train in (True, False):
        text = next(iter(dm._loader(train=train)))["text"]
        longest = int((text != 0).sum(1).max())
        assert text.shape[1] == (longest if trim else tokenizer.context_length)
        assert longest < tokenizer.context_length  # the case is not degenerate


def test_resampled_stream_needs_and_takes_an_epoch_length(tmp_path, shapes_dir, tokenizer):
    shards = str(shapes_set(shapes_dir) / "train-{000000..000002}.tar")
    dm = ShardDataModule(shards, shards, batch_size=50, num_workers=0, image_size=32, resampled=True)
    dm.attach(tokenizer, {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear"})
    with pytest.raises(ValueError, match="data.epoch_samples"):
        dm.train_dataloader()
    dm.epoch_samples = 500
    assert dm.resampled_epoch_batches(workers=1) == 10
    batches = list(dm._loader(train=True))
    assert len(batches) == 10 and all(b["image"].shape[0] == 50 for b in batches)
