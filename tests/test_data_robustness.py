"""Bad data does not stop training: each kind is skipped, counted into metrics.json and named in a warning;
where nothing usable is left, an error names why. Odd but usable images (CMYK, 16-bit, transparency)
become sane RGB."""

import io
import json
import logging
import struct
import tracemalloc
import warnings
import zlib
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import TINY, compose_config
from omegaconf import open_dict
from PIL import Image, ImageFile

from autoglm_train import train
from autoglm_train.data import shards as shards_module
from autoglm_train.data.shards import (
    MAX_CAPTION_CHARS,
    NoUsableSamplesError,
    SkipCounter,
    build_pipeline,
    decode,
    first_usable_sample,
    iter_captions,
    raw_samples,
)
from autoglm_train.lit.datamodule import ShardDataModule

BATCH, GOOD_PER_SHARD, GOOD_SHARDS = 4, 12, 3


def jpeg(k: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (k * 40 % 256, 90, 200 - k * 7 % 200)).save(out, format="JPEG")
    return out.getvalue()


def caption(k: int) -> bytes:
    return json.dumps({"captions": [f"a picture number {k}", f"image {k} again"]}).encode()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A genuine 1-bit black PNG of ``width`` x ``height``: 30,000 x 30,000 is 0.5 MB on disk (rows of zeros
    deflate ~230:1) and 2.7 GB decoded to RGB."""
    rows = bytes(1 + (width + 7) // 8) * 1000  # a filter byte and the packed bits, a thousand rows
    deflate = zlib.compressobj(1)
    idat = b"".join(deflate.compress(rows) for _ in range(height // 1000))
    idat += deflate.compress(rows[: (height % 1000) * (1 + (width + 7) // 8)]) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def encoded(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kwargs)
    return out.getvalue()


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


@pytest.mark.slow
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
    # a decompression bomb, a megabyte caption, a shard that is not a tar at all
    write_shard(shards / "train-000008.tar", 800, 4, {"png": png_bomb(30000, 30000), "json": caption(1)})
    write_shard(shards / "train-000009.tar", 850, 4, {"jpg": jpeg(3), "txt": b"word " * 200_000})
    (shards / "train-000010.tar").write_text("this is a text file, not a tar\n" * 40)
    write_shard(shards / "val-000000.tar", 900, 20)
    good = GOOD_SHARDS * GOOD_PER_SHARD + 5 * 4  # what a full pass can use (the vanished shard's 4 excluded)
    assert good % BATCH == 0

    cfg = compose_config(
        [
            *[o for o in TINY if not o.startswith("data.prepare")],
            "data=wds",
            f"data.train_shards='{shards}/train-{{000000..000010}}.tar'",
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
    assert metrics["data/skipped_image_too_large"] == 1
    assert metrics["data/skipped_caption_too_long"] == 1
    assert metrics["data/skipped_tar_error"] == 3  # the truncated tar, the vanished shard, the text file
    assert metrics["data/skipped"] == 8
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["data/skipped_tar_error"] == 3
    assert saved["data/skipped_image_too_large"] == saved["data/skipped_caption_too_long"] == 1
    said = "\n".join(r.getMessage() for r in caplog.records)
    for name in ("train-000003.tar", "train-000006.tar", "train-000007.tar", "train-000010.tar"):
        assert name in said, name


# --- each bad sample of issue 28 point 5, one by one (fast: no training) ---


def raw(key: str, **fields) -> dict:
    return {"__key__": key, "__url__": "test.tar", **fields}


@pytest.fixture
def decodes(monkeypatch) -> list[tuple[int, int]]:
    """Sizes of the images whose pixels get decoded (PIL's ImageFile.load) in this test."""
    seen, load = [], ImageFile.ImageFile.load

    def spy(self):
        seen.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return seen


@pytest.mark.parametrize(
    "size",
    [
        (30000, 30000),  # 900 MP: PIL itself raises DecompressionBombError at open
        (10000, 10000),  # 100 MP: PIL only warns (DecompressionBombWarning) and would decode
        (9000, 9000),  # 81 MP: PIL says nothing; over MAX_IMAGE_PIXELS (64 MP)
    ],
)
def test_decompression_bomb_is_refused_from_its_header_and_counted(size, decodes, monkeypatch):
    # decoding one would be the failure: make it fail at once instead of taking gigabytes
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail(f"decoded {self.size}"))
    bomb = png_bomb(*size)
    skips = SkipCounter()
    tracemalloc.start()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        out = decode(raw("bomb", png=bomb, txt=b"a bomb"), "captions", skips)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert out is None
    assert skips.counts == {"image_too_large": 1}
    assert skips.examples["image_too_large"].startswith("bomb in test.tar: ")  # named in the warning
    assert not [w for w in said if issubclass(w.category, Image.DecompressionBombWarning)]
    assert peak < 4 * len(bomb) + (2 << 20)  # the file's bytes and a little: no pixel buffer


def test_images_under_the_cap_still_decode(decodes):
    out = decode(raw("wide", png=png_bomb(8192, 64), txt=b"a wide one"), "captions", SkipCounter())
    assert out is not None and out["image"].size == (8192, 64) and decodes == [(8192, 64)]


def pixels(data: bytes, key: str = "png") -> np.ndarray:
    skips = SkipCounter()
    out = decode(raw("odd", **{key: data}, txt=b"an odd image"), "captions", skips)
    assert out is not None, skips.counts
    assert out["image"].mode == "RGB"
    return np.asarray(out["image"]).astype(int)


def test_cmyk_becomes_the_same_colours_in_rgb():
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red ink
    cmyk.paste((0, 0, 0, 128), (8, 0, 16, 8))  # half black
    got = pixels(encoded(cmyk, "JPEG", quality=95), "jpg")  # CMYK reaches us in JPEGs (Adobe, inverted)
    assert np.abs(got[4, 2] - (255, 0, 0)).max() <= 8
    assert np.abs(got[4, 13] - (127, 127, 127)).max() <= 8


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_grey_is_scaled_to_eight_bits_not_clipped(mode):
    levels = np.array([[0, 257 * 10, 32768, 65535]], dtype=np.uint16)
    if mode == "I;16":
        img = Image.open(io.BytesIO(encoded(Image.fromarray(levels))))  # a 16-bit greyscale PNG
    else:
        img = Image.fromarray(levels.astype(np.int32))  # what older Pillows open such a PNG as
    assert img.mode == mode
    got = np.asarray(shards_module.to_rgb(img)).astype(int)
    assert got[0, :, 0].tolist() == [0, 10, 128, 255]  # PIL's own convert("RGB") gives 0, 255, 255, 255
    assert (got == got[..., :1]).all()  # grey
    assert pixels(encoded(Image.fromarray(levels)))[0, :, 0].tolist() == [0, 10, 128, 255]


def test_transparency_is_composited_onto_white():
    # a palette image whose entry 0 (dark blue-grey) is transparent: PIL's convert("RGB") shows the grey
    pal = Image.new("P", (8, 4), 0)
    pal.putpalette([10, 20, 30, 200, 0, 0])
    pal.paste(1, (4, 0, 8, 4))
    got = pixels(encoded(pal, transparency=0))
    assert got[0, 0].tolist() == [255, 255, 255] and got[0, 6].tolist() == [200, 0, 0]
    # grey + alpha: clear, opaque, half
    la = Image.new("LA", (3, 1))
    la.putdata([(100, 0), (100, 255), (100, 128)])
    got = pixels(encoded(la))
    assert got[0, 0].tolist() == [255] * 3 and got[0, 1].tolist() == [100] * 3
    assert abs(got[0, 2, 0] - (100 * 128 + 255 * 127) / 255) <= 1
    rgba = Image.new("RGBA", (2, 1))
    rgba.putdata([(0, 0, 255, 0), (0, 0, 255, 255)])
    got = pixels(encoded(rgba, "WEBP", lossless=True), "webp")
    assert got[0].tolist() == [[255, 255, 255], [0, 0, 255]]
    # one colour of a greyscale image marked transparent (PNG tRNS)
    grey = Image.new("L", (2, 1))
    grey.putdata([7, 90])
    assert pixels(encoded(grey, transparency=7))[0].tolist() == [[255] * 3, [90] * 3]


def test_megabyte_caption_is_skipped_before_tokenizing_or_decoding(tmp_path, decodes):
    huge = "a very long caption " * 50_000  # 1 MB
    other = encoded(Image.new("RGB", (48, 40)), "JPEG")  # the good samples' images are 32 x 32
    with wds.TarWriter(str(tmp_path / "long.tar")) as sink:
        for k in range(3):
            sink.write({"__key__": f"s{k}", "jpg": jpeg(k), "json": caption(k)})
        sink.write({"__key__": "longtxt", "jpg": other, "txt": huge.encode()})
        sink.write(
            {"__key__": "longjson", "jpg": other, "json": json.dumps({"captions": ["ok", huge]}).encode()}
        )
    seen = []

    def tokenizer(texts):
        seen.extend(texts)
        return torch.zeros(len(texts), 4, dtype=torch.long)

    batches = list(
        build_pipeline(
            str(tmp_path / "long.tar"),
            tokenizer=tokenizer,
            transform=lambda im: torch.zeros(3, 2, 2),
            batch_size=2,
            train=False,
        )
    )
    assert sum(len(b["id"]) for b in batches) == 3
    assert sum(b["skipped"].get("caption_too_long", 0) for b in batches) == 2
    assert max(len(t) for t in seen) < 100  # the megabyte never reached the tokenizer
    assert decodes and (48, 40) not in decodes  # nor were those samples' images decoded
    assert max(len(c) for c in iter_captions(str(tmp_path / "long.tar"))) <= MAX_CAPTION_CHARS


@pytest.fixture
def not_tars(tmp_path) -> list[str]:
    (tmp_path / "text.tar").write_text("this is a text file, not a tar\n" * 40)
    (tmp_path / "random.tar").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp_path / "short.tar").write_text("too short to be a tar header")
    return [str(tmp_path / n) for n in ("text.tar", "random.tar", "short.tar")]


def test_shard_that_is_not_a_tar_is_skipped_counted_and_named(tmp_path, not_tars, caplog):
    write_shard(tmp_path / "good.tar", 0, 3)
    urls = [*not_tars, str(tmp_path / "good.tar")]
    with caplog.at_level(logging.WARNING, logger="autoglm_train.data.shards"):
        skips = SkipCounter()
        local = list(raw_samples(urls, skips))  # the local tar reader (embed, the feature cache, start-up)
        assert [s["__key__"] for s in local] == ["s00000", "s00001", "s00002"]
        assert skips.counts == {"tar_error": 3}
        said = "\n".join(r.getMessage() for r in caplog.records)
        for url in not_tars:
            assert f"{url}: not a tar file" in said, url
        caplog.clear()
        batches = list(  # webdataset's reader (training and validation batches)
            build_pipeline(
                urls,
                tokenizer=lambda t: torch.zeros(len(t), 4, dtype=torch.long),
                transform=lambda im: torch.zeros(3, 2, 2),
                batch_size=2,
                train=False,
            )
        )
        assert sum(len(b["id"]) for b in batches) == 3
        assert sum(b["skipped"].get("tar_error", 0) for b in batches) == 3
        said = "\n".join(r.getMessage() for r in caplog.records)
        for url in not_tars:
            assert url in said, url


def test_nothing_usable_left_is_an_error_naming_why(not_tars, tmp_path):
    with pytest.raises(NoUsableSamplesError, match="text.tar.*random.tar.*short.tar") as err:
        first_usable_sample(not_tars)
    assert "tar_error x3" in str(err.value) and "not a tar file" in str(err.value)
    # a run stops there, before training: ShardDataModule.prepare_data checks every shard set
    write_shard(tmp_path / "val.tar", 0, 2)
    with wds.TarWriter(str(tmp_path / "bombs.tar")) as sink:
        sink.write({"__key__": "b", "png": png_bomb(30000, 30000), "json": caption(0)})
    dm = ShardDataModule([*not_tars, str(tmp_path / "bombs.tar")], str(tmp_path / "val.tar"))
    with pytest.raises(NoUsableSamplesError, match="image_too_large x1") as err:
        dm.prepare_data()
    assert "tar_error x3" in str(err.value)
