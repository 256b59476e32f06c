import os

import pytest

from fastenc.data.shards import expand_shards

from .conftest import write_tar


@pytest.fixture
def shard_dir(tmp_path):
    for i in range(4):
        write_tar(tmp_path / f"shard-{i:05d}.tar", [(f"{i:09d}.txt", b"a caption")])
    (tmp_path / "notes.md").write_text("not a shard")
    return tmp_path


def _names(paths):
    return [os.path.basename(p) for p in paths]


def test_brace_dir_glob_and_lists(shard_dir):
    d = str(shard_dir)
    all4 = [f"shard-{i:05d}.tar" for i in range(4)]
    assert _names(expand_shards(f"{d}/shard-{{00000..00003}}.tar")) == all4
    assert _names(expand_shards(d)) == all4  # directory: its *.tar, sorted
    assert _names(expand_shards(shard_dir)) == all4  # PathLike
    assert _names(expand_shards(f"{d}/shard-0000[12].tar")) == all4[1:3]
    assert _names(expand_shards(f"{d}/shard-{{00000,00001}}.tar,{d}/shard-00003.tar")) == [all4[0], all4[1], all4[3]]
    assert _names(expand_shards([f"{d}/shard-00002.tar", f"{d}/*1.tar"])) == [all4[2], all4[1]]
    assert _names(expand_shards(f"{d}/shard-00000.tar::{d}/shard-00001.tar")) == all4[:2]  # webdataset's separator


def test_missing_shards_are_named(shard_dir):
    d = str(shard_dir)
    with pytest.raises(FileNotFoundError, match=r"2 of 6 shards .* missing: .*shard-00004.tar"):
        expand_shards(f"{d}/shard-{{00000..00005}}.tar")
    with pytest.raises(FileNotFoundError, match="all 3 expanded paths are missing"):
        expand_shards(f"{d}/other-{{0..2}}.tar")
    with pytest.raises(FileNotFoundError, match="no file matches the glob"):
        expand_shards(f"{d}/*.tgz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand_shards(f"{d}/shard-00000.tar,{d}/nope.tar")
    with pytest.raises(FileNotFoundError, match="empty"):
        expand_shards("")


def test_missing_demo_dir_suggests_synth(tmp_path):
    demo = tmp_path / "synth"
    with pytest.raises(FileNotFoundError, match=f"fastenc data synth --out {demo}"):
        expand_shards(f"{demo}/shard-{{00000..00009}}.tar")
    with pytest.raises(FileNotFoundError, match=f"does not exist.*fastenc data synth --out {demo}`"):
        expand_shards(demo)
    demo.mkdir()
    with pytest.raises(FileNotFoundError, match="contains no .tar files.*fastenc data synth --out"):
        expand_shards(demo)


def test_empty_and_non_tar_files_are_dropped_with_warning(shard_dir):
    (shard_dir / "shard-00004.tar").write_bytes(b"")
    (shard_dir / "shard-00005.tar").write_bytes(b"<html>404 not found</html>" * 40)
    with pytest.warns(UserWarning, match=r"skipping 2 of 6 shards: .*shard-00004.tar is empty.*00005.tar is not a tar"):
        paths = expand_shards(shard_dir)
    assert len(paths) == 4
    with pytest.raises(ValueError, match="none of the 1 shards can be read"):
        expand_shards(shard_dir / "shard-00004.tar")
    assert len(expand_shards(shard_dir, check=False)) == 6


def test_remote_specs_pass_through():
    urls = expand_shards("pipe:curl -s https://host/shard-{000..002}.tar")
    assert urls == [f"pipe:curl -s https://host/shard-{i:03d}.tar" for i in range(3)]
