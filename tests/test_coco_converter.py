"""COCO Captions -> shards converter, on a generated COCO-format fixture (tests/coco_fixture.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from coco_fixture import image_ids, make_coco_fixture
from PIL import Image

from autoglm_train.data.coco import ConversionError, convert, main
from autoglm_train.data.shards import expand_shards, first_usable_sample

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fx(tmp_path) -> dict:
    return make_coco_fixture(tmp_path / "coco_src")


def read_shards(urls: list[str]) -> list[dict]:
    """Every sample as the training pipeline's reader (webdataset) sees it, in order, json parsed."""
    samples = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    return [{**sample, "meta": json.loads(sample["json"])} for sample in samples]


def read_split(out: Path, split: str) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return read_shards(expand_shards(str(out / manifest["splits"][split]["shards"])))


def run(fx: dict, out: Path, karpathy: bool = True, **kwargs) -> dict:
    return convert(
        fx["images"],
        fx["captions_files"],
        out,
        karpathy=fx["karpathy"] if karpathy else None,
        progress=False,
        **kwargs,
    )


def shard_stamps(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.glob("*.tar")}


def rewrite_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_round_trip_keeps_ids_all_captions_bytes_and_split(fx, tmp_path):
    out = tmp_path / "coco"
    run(fx, out)
    for split, ids in fx["splits"].items():
        samples = read_split(out, split)
        assert [s["__key__"] for s in samples] == [f"{i:012d}" for i in ids]  # ordered by id
        for sample in samples:
            meta = sample["meta"]
            assert meta["split"] == split and sample["__key__"] == f"{meta['id']:012d}"
            assert meta["captions"] == fx["captions"][meta["id"]]  # all five, stripped, annotation order
            assert meta["file_name"] == f"{meta['id']:012d}.jpg"
            assert sample["jpg"] == fx["files"][meta["id"]].read_bytes()  # bytes exactly as stored
    # and the training pipeline's own reader takes them
    assert first_usable_sample(str(out / "test-{000000..000000}.tar"))["captions"][0].startswith("a ")


def test_karpathy_split_train_includes_restval(fx, tmp_path):
    karpathy = json.loads(fx["karpathy"].read_text())["images"]
    assert {"train", "restval", "val", "test"} <= {image["split"] for image in karpathy}
    manifest = run(fx, tmp_path / "coco")
    counts = {split: s["samples"] for split, s in manifest["splits"].items()}
    assert counts == {"train": 6, "val": 2, "test": 4}
    assert (
        sorted(image["cocoid"] for image in karpathy if image["split"] in ("train", "restval"))
        == (fx["splits"]["train"])
    )
    assert manifest["splits"]["train"]["captions"] == 6 * 5
    assert manifest["skipped"] == {
        "missing_image": 0,
        "no_captions": 0,
        "not_in_karpathy": 0,
        "unsupported_format": 0,
    }


def test_without_karpathy_split_comes_from_captions_file_name(fx, tmp_path):
    out = tmp_path / "coco"
    manifest = run(fx, out, karpathy=False)
    assert list(manifest["splits"]) == ["train", "val"]
    for split, ids in fx["splits_2017"].items():
        assert [s["meta"]["id"] for s in read_split(out, split)] == ids
        assert {s["meta"]["split"] for s in read_split(out, split)} == {split}
    # a name saying neither train nor val counts as train
    other = fx["root"] / "annotations" / "captions_extra.json"
    other.write_text(fx["captions_files"][1].read_text())
    manifest = convert(fx["images"], [other], tmp_path / "extra", progress=False)
    assert list(manifest["splits"]) == ["train"]
    assert manifest["splits"]["train"]["samples"] == len(fx["splits_2017"]["val"])


def test_shards_chunked_by_id_with_sizes_and_manifest_patterns(fx, tmp_path):
    out = tmp_path / "coco"
    manifest = run(fx, out, shard_size=4)
    assert json.loads((out / "sizes.json").read_text()) == {
        "train-000000.tar": 4,
        "train-000001.tar": 2,
        "val-000000.tar": 2,
        "test-000000.tar": 4,
    }
    assert manifest["shard_size"] == 4
    assert manifest["splits"]["train"] == {
        "shards": "train-{000000..000001}.tar",
        "num_shards": 2,
        "samples": 6,
        "captions": 30,
    }
    assert manifest["splits"]["test"]["shards"] == "test-{000000..000000}.tar"
    assert manifest["inputs"] == {
        "images": str(fx["images"]),
        "captions": ["captions_train2017.json", "captions_val2017.json"],
        "karpathy": "dataset_coco.json",
    }
    assert manifest["complete"] is True
    assert json.loads((out / "manifest.json").read_text()) == manifest
    patterns = [str(out / s["shards"]) for s in manifest["splits"].values()]
    assert sorted(expand_shards(patterns)) == sorted(str(p) for p in out.glob("*.tar"))
    first = read_shards([str(out / "train-000000.tar")])
    assert [s["meta"]["id"] for s in first] == fx["splits"]["train"][:4]
    assert (out / "missing_images.txt").read_text() == ""


def test_same_inputs_give_byte_identical_shards(fx, tmp_path):
    run(fx, tmp_path / "a", shard_size=5)
    run(fx, tmp_path / "b", shard_size=5)
    names = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert names == sorted(p.name for p in (tmp_path / "b").glob("*.tar"))
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_missing_images_counted_listed_and_skipped(tmp_path):
    ids = image_ids(12)
    gone = [ids[1], ids[7]]
    fx = make_coco_fixture(tmp_path / "src", missing=gone)
    out = tmp_path / "coco"
    manifest = run(fx, out)
    assert manifest["skipped"]["missing_image"] == 2
    assert manifest["missing_images"] == gone
    assert (out / "missing_images.txt").read_text() == "".join(f"{i}\t{i:012d}.jpg\n" for i in gone)
    converted = [s["meta"]["id"] for split in manifest["splits"] for s in read_split(out, split)]
    assert sorted(converted) == sorted(set(ids) - set(gone))
    assert sum(s["samples"] for s in manifest["splits"].values()) == 10


def test_image_without_captions_is_skipped_and_counted(fx, tmp_path):
    silent = fx["splits_2017"]["train"][0]
    rewrite_json(
        fx["captions_files"][0],
        lambda d: d.update(annotations=[a for a in d["annotations"] if a["image_id"] != silent]),
    )
    manifest = run(fx, tmp_path / "coco", karpathy=False)
    assert manifest["skipped"]["no_captions"] == 1
    assert manifest["splits"]["train"]["samples"] == len(fx["splits_2017"]["train"]) - 1


def test_karpathy_sentences_fill_in_captions_the_jsons_lack(fx, tmp_path):
    target = fx["splits"]["test"][0]
    for path in fx["captions_files"]:
        rewrite_json(
            path, lambda d: d.update(annotations=[a for a in d["annotations"] if a["image_id"] != target])
        )

    def karpathy_captions(d):
        image = next(im for im in d["images"] if im["cocoid"] == target)
        image["sentences"] = [{"raw": " from karpathy one "}, {"raw": "from karpathy two"}]

    rewrite_json(fx["karpathy"], karpathy_captions)
    out = tmp_path / "coco"
    run(fx, out)
    by_id = {s["meta"]["id"]: s["meta"] for s in read_split(out, "test")}
    assert by_id[target]["captions"] == ["from karpathy one", "from karpathy two"]
    other = fx["splits"]["test"][1]
    assert by_id[other]["captions"] == fx["captions"][other]


def test_images_found_by_karpathy_2014_names(fx, tmp_path):
    """A 2014 download: val2014/COCO_val2014_000000000100.jpg; only the Karpathy file names them so."""
    images = tmp_path / "images2014"
    karpathy = json.loads(fx["karpathy"].read_text())["images"]
    for image in karpathy:
        (images / image["filepath"]).mkdir(parents=True, exist_ok=True)
        fx["files"][image["cocoid"]].rename(images / image["filepath"] / image["filename"])
    out = tmp_path / "coco"
    manifest = convert(images, fx["captions_files"], out, karpathy=fx["karpathy"], progress=False)
    assert manifest["skipped"]["missing_image"] == 0
    meta = read_split(out, "val")[0]["meta"]
    assert meta["file_name"].startswith("COCO_val2014_")


def test_png_image_kept_as_png(fx, tmp_path):
    target = fx["splits_2017"]["val"][0]
    png = fx["files"][target].with_suffix(".png")
    Image.open(fx["files"][target]).save(png)
    fx["files"][target].unlink()
    rewrite_json(
        fx["captions_files"][1],
        lambda d: [im.update(file_name=png.name) for im in d["images"] if im["id"] == target],
    )
    out = tmp_path / "coco"
    run(fx, out, karpathy=False)
    sample = next(s for s in read_split(out, "val") if s["meta"]["id"] == target)
    assert "jpg" not in sample and sample["png"] == png.read_bytes()
    assert sample["meta"]["file_name"] == png.name


def _break(fx: dict, what: str) -> tuple[dict, str]:
    """Arguments for convert() with one input broken, and the message expected."""
    args = {"images": fx["images"], "captions": list(fx["captions_files"]), "karpathy": fx["karpathy"]}
    train = fx["captions_files"][0]
    if what == "images_dir":
        args["images"] = fx["root"] / "nope"
        return args, "images folder not found"
    if what == "captions_file":
        args["captions"] = [train, fx["root"] / "captions_val2099.json"]
        return args, "COCO captions file not found: .*captions_val2099.json"
    if what == "karpathy_file":
        args["karpathy"] = fx["root"] / "dataset_flickr.json"
        return args, "Karpathy split file not found: .*dataset_flickr.json"
    if what == "invalid_json":
        train.write_text('{"images": [')
        return args, r"captions_train2017.json: not valid JSON \(.* line 1"
    if what == "captions_shape":
        train.write_text(json.dumps([{"id": 1}]))
        return args, (
            "captions_train2017.json: expected a COCO captions file with 'images' and 'annotations' lists"
        )
    if what == "instances_file":
        rewrite_json(train, lambda d: d.update(annotations=[{"image_id": 1, "bbox": [0, 0, 1, 1]}]))
        return args, r"annotations\[0\] needs an integer 'image_id' and a string 'caption'"
    if what == "no_annotations":
        rewrite_json(train, lambda d: d.update(annotations=[]))
        return args, "captions_train2017.json: the 'annotations' list is empty"
    if what == "karpathy_shape":
        fx["karpathy"].write_text(json.dumps({"dataset": "coco"}))
        return args, "dataset_coco.json: expected a Karpathy split file .* with an 'images' list"
    if what == "karpathy_split":
        rewrite_json(fx["karpathy"], lambda d: d["images"][0].update(split="holdout"))
        return args, "images\\[0\\] has split 'holdout'"
    if what == "nothing_converted":
        for path in fx["files"].values():
            path.unlink()
        return args, "nothing to convert: 12 images listed, none usable .*missing_image 12"
    raise AssertionError(what)


@pytest.mark.parametrize(
    "what",
    [
        "images_dir",
        "captions_file",
        "karpathy_file",
        "invalid_json",
        "captions_shape",
        "instances_file",
        "no_annotations",
        "karpathy_shape",
        "karpathy_split",
        "nothing_converted",
    ],
)
def test_refusals_say_which_file_and_why(fx, tmp_path, what):
    args, message = _break(fx, what)
    with pytest.raises(ConversionError, match=message):
        convert(out=tmp_path / "coco", progress=False, **args)
    assert issubclass(ConversionError, ValueError)
    assert not list(tmp_path.glob("coco/*.tar"))


def test_resume_keeps_finished_shards_and_redoes_the_rest(fx, tmp_path):
    out = tmp_path / "coco"
    run(fx, out, shard_size=2)
    names = sorted(p.name for p in out.glob("*.tar"))
    assert len(names) == 6  # train 3, val 1, test 2
    last = out / "train-000002.tar"
    reference = last.read_bytes()
    # as if interrupted while writing the last train shard
    last.unlink()
    (out / "train-000002.tar.tmp").write_bytes(b"half a shard")
    (out / "test-000001.tar.tmp").write_bytes(b"left by an older interruption")
    before = shard_stamps(out)
    manifest = run(fx, out, shard_size=2)
    assert {name: stamp for name, stamp in shard_stamps(out).items() if name in before} == before
    assert last.read_bytes() == reference
    assert sorted(p.name for p in out.glob("*.tar")) == names
    assert not list(out.glob("*.tmp"))
    assert manifest["complete"] is True and manifest == json.loads((out / "manifest.json").read_text())
    # a rerun of a finished conversion writes nothing
    stamps = shard_stamps(out)
    run(fx, out, shard_size=2)
    assert shard_stamps(out) == stamps


def test_rerun_with_other_shard_size_or_inputs_is_refused(fx, tmp_path):
    out = tmp_path / "coco"
    run(fx, out, shard_size=2)
    stamps = shard_stamps(out)
    with pytest.raises(
        ConversionError, match="shards of 2 samples .* --shard-size 3; use a new --out or delete"
    ):
        run(fx, out, shard_size=3)
    with pytest.raises(ConversionError, match="made from other inputs.*use a new --out or delete"):
        run(fx, out, karpathy=False, shard_size=2)
    assert shard_stamps(out) == stamps
    # shards of unknown origin (no manifest) are not mixed with ours either
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "train-000000.tar").write_bytes(b"")
    with pytest.raises(ConversionError, match="already holds shards .* but no manifest.json"):
        run(fx, stray)


def test_cli_refusal_exits_2_with_error_line(fx, tmp_path):
    cmd = [sys.executable, "-m", "autoglm_train.data.coco", "--images", str(fx["images"]), "--captions"]
    cmd += [str(fx["root"] / "missing.json"), "--out", str(tmp_path / "coco"), "--no-progress"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("error: COCO captions file not found:") and "missing.json" in done.stderr
    assert not (tmp_path / "coco").exists()


def test_cli_prints_summary(fx, tmp_path, capsys):
    out = tmp_path / "coco"
    argv = ["--images", str(fx["images"]), "--captions", *map(str, fx["captions_files"])]
    argv += ["--karpathy", str(fx["karpathy"]), "--out", str(out), "--shard-size", "3", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "train: 6 samples, 30 captions, 2 shards (train-{000000..000001}.tar)" in printed
    assert "test: 4 samples, 20 captions, 2 shards" in printed and "skipped: none" in printed
    assert str(out / "manifest.json") in printed
