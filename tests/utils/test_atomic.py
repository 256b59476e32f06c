"""fastenc.utils.atomic: the one atomic writer."""

import os

import pytest

from fastenc.utils import atomic


def test_write_text_creates_parent_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a" / "b" / "x.json"
    atomic.write_json(str(path), {"k": 1})
    assert path.read_text() == '{\n "k": 1\n}\n'
    assert os.listdir(path.parent) == ["x.json"]


def test_failure_keeps_the_old_file_and_removes_the_temp(tmp_path):
    path = tmp_path / "x.txt"
    atomic.write_text(str(path), "old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(str(path)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.txt"]


def test_temp_name_keeps_the_extension_and_is_recognised(tmp_path):
    tmp = atomic.temp_name(str(tmp_path / "plot.png"))
    assert os.path.dirname(tmp) == str(tmp_path)
    assert tmp.endswith(".png") and os.path.basename(tmp).startswith(".")
    assert atomic.is_temp_name(tmp) and not atomic.is_temp_name(str(tmp_path / "plot.png"))
    assert atomic.temp_name(str(tmp_path / "plot.png")) != tmp  # concurrent writers never share one
    assert atomic.temp_target(tmp) == "plot.png"
    for name in ("shard-00001.tar", "manifest.json", "latest", "a.b.idx.json"):
        assert atomic.temp_target(atomic.temp_name(str(tmp_path / name))) == name
    for other in (".hidden", ".x.tar.123.tmp.tar", "x.tar", ".x.tar.1.0123abcd.tmp.png"):
        assert atomic.temp_target(other) is None, other


def test_writing_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic.atomic_path(str(tmp_path / "x.bin")):
            pass
    assert not os.path.exists(tmp_path / "x.bin")


def test_bytes_roundtrip_without_fsync(tmp_path):
    atomic.write_bytes(str(tmp_path / "x.bin"), b"\x00\x01", fsync=False)
    assert (tmp_path / "x.bin").read_bytes() == b"\x00\x01"
