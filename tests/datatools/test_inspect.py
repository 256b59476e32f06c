"""`fastenc data inspect`: counts, statistics, contact sheet and caption histogram of a shard set."""

import io
import json
import os

from PIL import Image

from fastenc.cli import main
from fastenc.data.index import build_index
from fastenc.datatools.inspect import _counter_stats, inspect_shards

from .conftest import write_tar


def jpeg(size, color=(20, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def make_shards(root) -> list[str]:
    """Two shards, 12 samples: 9 good (captions of 1..9 words, widths 30..38), 1 corrupt image, 1 without
    caption, 1 with a non-UTF-8 caption; plus one json-less sample."""
    a, b = [], []
    for i in range(9):
        key = f"{i:09d}"
        files = a if i < 5 else b
        files.append((f"{key}.jpg", jpeg((30 + i, 20))))
        files.append((f"{key}.txt", " ".join(["word"] * (i + 1)).encode()))
        if i != 8:
            files.append((f"{key}.json", json.dumps({"key": key, "label": f"c{i % 3}"}).encode()))
    b += [("000000009.jpg", jpeg((40, 40))[:150]), ("000000009.txt", b"a corrupt one"), ("000000009.json", b"{}"),
          ("000000010.png", _png()), ("000000010.json", b"{}"),
          ("000000011.jpg", jpeg((50, 20))), ("000000011.txt", b"\xff\xfebad"), ("000000011.json", b"{}")]
    return [write_tar(root / "s-0.tar", a), write_tar(root / "s-1.tar", b)]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "white").save(buf, format="PNG")
    return buf.getvalue()


def test_counts_stats_and_files(tmp_path):
    shards = make_shards(tmp_path)
    r = inspect_shards(str(tmp_path), tmp_path / "out", num_samples=32, progress=False)
    assert (r["num_shards"], r["num_samples"], r["num_unreadable_shards"]) == (2, 12, 0)
    assert r["total_bytes"] == sum(os.path.getsize(s) for s in shards)
    assert (r["with_image"], r["with_caption"], r["caption_invalid"], r["with_json"]) == (12, 10, 1, 11)
    assert r["caption_invalid_reasons"] == {"caption is not UTF-8": 1}
    assert r["extensions"] == {"jpg": 11, "json": 11, "txt": 11, "png": 1}
    # All 12 are sampled: sizes of the 11 decodable images.
    assert r["num_sampled"] == 12 and r["image_size"]["num_decoded"] == 11
    assert r["image_size"]["width"] == {"min": 30, "median": 35, "max": 64}
    assert r["image_size"]["height"] == {"min": 20, "median": 20, "max": 48}
    assert [c["key"] for c in r["sampled_corrupt"]] == ["000000009"]
    assert r["caption_words"] == {"min": 1, "median": 4.5, "max": 9, "mean": 4.8}  # 1..9 and "a corrupt one"
    assert r["caption_chars"]["min"] == 4 and r["caption_chars"]["max"] == len(" ".join(["word"] * 9))
    assert r["index"] == {"shards_with_index": 0, "shards_without_current_index": 2}
    for name in ("inspect.json", "contact_sheet.png", "caption_lengths.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert json.loads((tmp_path / "out" / "inspect.json").read_text())["num_samples"] == 12
    with Image.open(tmp_path / "out" / "contact_sheet.png") as sheet:
        assert sheet.width > 8 * 128 and sheet.height > 2 * 128  # 12 cells: 8 columns, 2 rows


def test_index_reports_are_summarized(tmp_path):
    shards = make_shards(tmp_path)
    for s in shards:
        build_index(s)
    r = inspect_shards(shards, tmp_path / "out", num_samples=4, progress=False)
    ix = r["index"]
    assert ix["shards_with_index"] == 2 and ix["shards_without_current_index"] == 0
    assert ix["num_samples"] == 11 and ix["num_excluded"] == 1 and ix["num_no_caption"] == 2
    assert ix["excluded_reasons"] == {"image cannot be decoded": 1}
    assert ix["no_caption_reasons"] == {"missing caption": 1, "caption is not UTF-8": 1}


def test_reservoir_sample_is_seeded(tmp_path):
    make_shards(tmp_path)

    def keys(seed, out):
        r = inspect_shards(str(tmp_path), tmp_path / out, num_samples=3, seed=seed, progress=False)
        assert r["num_sampled"] == 3 and r["num_samples"] == 12
        return r["image_size"], [c["key"] for c in r["sampled_corrupt"]]

    assert keys(0, "a") == keys(0, "b")
    assert len({json.dumps(keys(s, f"s{s}")) for s in range(6)}) > 1  # different seeds, different samples


def test_cli_reports_unreadable_shard(tmp_path, capsys):
    make_shards(tmp_path)
    (tmp_path / "x.tar").write_bytes(os.urandom(4096))
    out = tmp_path / "out"
    assert main(["data", "inspect", str(tmp_path), "--out", str(out), "--num-samples", "5", "--seed", "1"]) == 1
    text = capsys.readouterr().out
    assert "12 samples in 3 shard(s)" in text and "unreadable: " in text and "x.tar" in text
    r = json.loads((out / "inspect.json").read_text())
    assert r["num_unreadable_shards"] == 1 and r["unreadable_shards"][0]["shard"].endswith("x.tar")
    assert r["num_sampled"] == 5
    assert main(["data", "inspect", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_no_captions_and_stats_helper(tmp_path):
    write_tar(tmp_path / "a.tar", [(f"{i:09d}.jpg", jpeg((32, 32))) for i in range(3)])
    r = inspect_shards(str(tmp_path / "a.tar"), tmp_path / "out", progress=False)
    assert r["with_caption"] == 0 and r["caption_words"] is None and r["with_json"] == 0
    assert (tmp_path / "out" / "caption_lengths.png").exists()
    from collections import Counter

    assert _counter_stats(Counter({1: 1, 2: 1, 10: 2})) == {"min": 1, "median": 6, "max": 10, "mean": 5.75}
    assert _counter_stats(Counter()) is None
