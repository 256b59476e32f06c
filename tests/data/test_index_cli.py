"""`fastenc data index`: builds missing or stale DALI indexes, reports unreadable shards (exit 1), --force rebuilds."""

import io
import os

from PIL import Image

from fastenc.cli import main
from fastenc.data.index import read_report
from fastenc.datatools.synth import write_synthetic_shards

from .conftest import write_tar


def synth_without_indexes(path, n, per_shard):
    write_synthetic_shards(path, n, image_size=32, samples_per_shard=per_shard, progress=False)
    for f in os.listdir(path):  # synth indexes its shards itself
        if f.endswith((".idx", ".idx.json")):
            os.remove(os.path.join(path, f))


def test_builds_missing_indexes_and_reports(tmp_path, capsys):
    synth_without_indexes(tmp_path, 20, 10)
    shards = [str(tmp_path / f"shard-0000{i}.tar") for i in range(2)]
    write_tar(tmp_path / "shard-00002.tar", [("a.jpg", b"not an image"), ("a.txt", b"cap"),
                                             ("b.jpg", _jpeg())])
    shards.append(str(tmp_path / "shard-00002.tar"))
    assert all(read_report(s) is None for s in shards)
    assert main(["data", "index", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3 shard(s): 3 indexed with validation, 0 already current. 21 usable sample(s), 20 with a caption." in out
    assert "excluded 1 sample(s) (not in the index): 1 image cannot be decoded" in out
    assert "kept 1 sample(s) without caption" in out
    reports = [read_report(s) for s in shards]
    assert all(r is not None and r.validated for r in reports) and reports[2].num_samples == 1
    for s in shards:
        assert os.path.exists(s[:-4] + ".idx") and os.path.exists(s[:-4] + ".idx.json")

    # Current indexes are kept; --force rebuilds them all.
    mtime = os.path.getmtime(shards[0][:-4] + ".idx")
    assert main(["data", "index", str(tmp_path)]) == 0
    assert "0 indexed with validation, 3 already current" in capsys.readouterr().out
    os.utime(shards[0][:-4] + ".idx", (mtime - 100, mtime - 100))
    assert main(["data", "index", str(tmp_path), "--force", "--no-validate"]) == 0
    assert "3 indexed (quick checks), 0 already current" in capsys.readouterr().out
    assert os.path.getmtime(shards[0][:-4] + ".idx") > mtime - 100
    assert not read_report(shards[0]).validated
    # A validated run redoes the quick-check indexes.
    assert main(["data", "index", str(tmp_path)]) == 0
    assert "3 indexed with validation" in capsys.readouterr().out


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, format="JPEG")
    return buf.getvalue()


def test_unreadable_shard_exits_1(tmp_path, capsys):
    synth_without_indexes(tmp_path, 5, 5)
    (tmp_path / "x.tar").write_bytes(os.urandom(4096))
    index_dir = tmp_path / "idx"
    assert main(["data", "index", str(tmp_path), "--index-dir", str(index_dir)]) == 1
    io_ = capsys.readouterr()
    assert "could not read" in io_.err and "x.tar" in io_.err and "not a readable tar" in io_.err
    assert "1 of 2 shard(s) could not be read" in io_.err
    assert "5 usable sample(s)" in io_.out
    assert sorted(os.listdir(index_dir)) == ["shard-00000.idx", "shard-00000.idx.json", "x.idx", "x.idx.json"]
    # The unreadable shard's empty index records why, so the next run reports it again without re-reading it.
    assert "not a readable tar" in read_report(str(tmp_path / "x.tar"), str(index_dir / "x.idx")).error
    assert main(["data", "index", str(tmp_path), "--index-dir", str(index_dir)]) == 1
    io_ = capsys.readouterr()
    assert "0 indexed with validation, 2 already current" in io_.out and "x.tar" in io_.err
    assert "empty shard" not in io_.out


def test_empty_shard_and_missing_spec(tmp_path, capsys):
    write_tar(tmp_path / "e.tar", [])
    assert main(["data", "index", str(tmp_path / "e.tar")]) == 0
    assert "1 empty shard(s)" in capsys.readouterr().out
    assert main(["data", "index", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
