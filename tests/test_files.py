"""Files others read are whole or absent: a writer that fails or is killed midway leaves the old file."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from autoglm_train.utils import files
from autoglm_train.utils.files import atomic_write_text

OLD = json.dumps({"val/r1_mean": 0.5})


def test_a_write_that_fails_midway_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, OLD)

    def fail_after_the_data_was_written(fd):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "fsync", fail_after_the_data_was_written)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, json.dumps({"val/r1_mean": 0.9, "pad": "x" * 100_000}))
    assert path.read_text() == OLD
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from autoglm_train.utils import files

    # killed after the new text is on disk but before the rename: what SIGKILL can do to any writer
    files.os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
    files.atomic_write_text(sys.argv[1], '{"val/r1_mean": ' + "9" * 1_000_000)
    """
)


def test_a_killed_writer_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, OLD)
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert json.loads(path.read_text()) == json.loads(OLD)


def test_the_new_file_has_the_usual_permissions(tmp_path):
    path = tmp_path / "summary.md"
    atomic_write_text(path, "# a\r\nb\n")
    assert path.read_bytes() == b"# a\r\nb\n"  # written as given (a CSV's \r\n stays)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
