"""The fast local tar reader yields the samples webdataset yields, whatever tar dialect wrote the shard."""

import io
import tarfile

import pytest
import webdataset as wds

from autoglm_train.data import tar_reader
from autoglm_train.data.shards import SkipCounter, raw_samples


def webdataset_samples(path: str) -> tuple[list[dict], int]:
    errors = []
    keep_going = lambda exn: errors.append(exn) or True  # noqa: E731  (as SkipCounter.tar_error)
    pipeline = wds.DataPipeline(wds.SimpleShardList([path]), wds.tarfile_to_samples(handler=keep_going))
    return list(pipeline), len(errors)


def ours(path: str) -> tuple[list[dict], int]:
    errors = []
    return list(tar_reader.samples(path, errors.append)), len(errors)


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind=tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime = kind, len(data), 1.5e9 + 0.25  # a float mtime: a pax header
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_samples_match_webdataset_in_every_tar_format(tmp_path, fmt):
    path = str(tmp_path / "shard.tar")
    deep = "d/" + "x" * 90 + "/" + "y" * 60  # over 100 characters: ustar prefix, GNU or pax long name
    with tarfile.open(path, "w", format=fmt) as tar:
        add(tar, "__meta__", b"skipped")
        add(tar, "dir", kind=tarfile.DIRTYPE)
        add(tar, "a.png", b"\x89PNG a")
        add(tar, "a.JSON", b'{"captions": ["a"]}')  # suffixes are lower-cased
        add(tar, "a.extra.txt", b"two dots: suffix extra.txt")
        add(tar, "nosuffix", b"skipped: no key")
        add(tar, "link", kind=tarfile.SYMTYPE)
        add(tar, f"{deep}.png", b"deep " * 300)
        add(tar, f"{deep}.txt", "ünïcode caption".encode())
        add(tar, "b.png", b"")  # an empty member
        add(tar, "b.png", b"again")  # a repeated suffix: an error, that file dropped
        add(tar, "c.txt", b"last")
    want, want_errors = webdataset_samples(path)
    got, got_errors = ours(path)
    assert got == want and got_errors == want_errors == 1
    assert [s["__key__"] for s in got] == ["a", deep, "b", "c"]
    assert list(raw_samples([path], SkipCounter())) == want


def test_a_truncated_shard_yields_what_precedes_the_damage_and_counts_an_error(tmp_path):
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(5):
            add(tar, f"s{i}.txt", b"x" * 2000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    skips = SkipCounter()
    got = list(raw_samples([str(path)], skips))
    assert 0 < len(got) < 5 and skips.counts["tar_error"] == 1
    assert all(s["txt"] == b"x" * 2000 for s in got[:-1])
    corrupt = bytearray(data)
    corrupt[0] ^= 0xFF  # the first header's name: its checksum no longer matches
    path.write_bytes(bytes(corrupt))
    skips = SkipCounter()
    assert list(raw_samples([str(path)], skips)) == [] and skips.counts["tar_error"] == 1
