"""`fastenc data ingest`: image folders (captions from CSV, JSONL, file names, sidecars; class folders) and
img2dataset webdataset output -> validated shards + DALI indexes + manifest.json."""

import csv
import gzip
import io
import json
import os
import tarfile

import pytest
from PIL import Image

from fastenc.cli import main
from fastenc.data.index import read_report, split_name
from fastenc.datatools.ingest import DataToolError, ingest
from fastenc.utils.atomic import is_temp_name, temp_name

from .conftest import write_tar


def image_bytes(color=(200, 30, 30), size=(40, 32), fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def put(path, data) -> bytes:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
    return data


def read_samples(out_dir) -> list[dict]:
    """Every sample of the output shards, grouped as webdataset does, in shard order."""
    manifest = json.loads((out_dir / "manifest.json").read_text())
    samples = []
    for name in manifest["shards"]:
        key = None
        with tarfile.open(out_dir / name) as tar:
            for info in tar:
                k, ext = split_name(info.name)
                if k != key:
                    samples.append({"__key__": k, "__shard__": name})
                    key = k
                samples[-1][ext] = tar.extractfile(info).read()
    return samples


def check_output(out_dir, manifest):
    """Shards, indexes and manifest agree; returns the samples."""
    samples = read_samples(out_dir)
    assert len(samples) == manifest["num_samples"]
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(len(samples))]
    assert sum("txt" in s for s in samples) == manifest["num_captioned"]
    reports = [read_report(str(out_dir / name)) for name in manifest["shards"]]
    assert all(r is not None and r.validated for r in reports)
    assert sum(r.num_samples for r in reports) == manifest["num_samples"]
    assert sum(r.num_captioned for r in reports) == manifest["num_captioned"]
    assert manifest["total_bytes"] == sum(os.path.getsize(out_dir / n) for n in manifest["shards"])
    assert not [f for f in os.listdir(out_dir) if is_temp_name(f)]
    for s in samples:
        meta = json.loads(s["json"])
        assert meta["key"] == s["__key__"]
        assert "txt" not in s or s["txt"].decode() == s["txt"].decode().strip()
        for k in ("width", "height"):
            assert isinstance(meta[k], int)
    return samples


def by_source(samples) -> dict:
    return {json.loads(s["json"])["source"]: s for s in samples}


def make_folder(root, names, colors=None) -> dict:
    """Images under root (paths relative to it); returns {rel path: bytes}."""
    out = {}
    for i, rel in enumerate(names):
        fmt = "PNG" if rel.endswith(".png") else "WEBP" if rel.endswith(".webp") else "JPEG"
        out[rel] = put(root / rel, image_bytes(((37 * i) % 256, (91 * i) % 256, 120), fmt=fmt))
    return out


def test_folder_with_csv_captions(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    images = make_folder(src, ["a.jpg", "b.png", "sub/c.jpeg", "sub/deeper/d.webp", "e.JPG", "sub/f.jpg"])
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "caption", "license"])
        w.writerow(["a.jpg", "  a red square  ", "cc-by"])
        w.writerow(["b.png", "a png image", "cc0"])
        w.writerow(["sub/c.jpeg", "in a subfolder", ""])
        w.writerow(["d.webp", "found by its bare name", "x"])
        w.writerow(["e.JPG", "upper-case extension", "x"])
        w.writerow(["sub/f.jpg", "", "x"])  # empty caption: kept without .txt
        w.writerow(["gone.jpg", "names no image", "x"])
    m = ingest(src, out, captions_file=tmp_path / "captions.csv", samples_per_shard=4, progress=False)
    assert (m["format"], m["captions"], m["num_inputs"], m["num_samples"], m["num_shards"]) == \
        ("folder", "file", 6, 6, 2)
    assert m["num_captioned"] == 5 and m["num_skipped"] == 0 and m["shards"] == ["shard-00000.tar", "shard-00001.tar"]
    assert m["no_caption_reasons"] == {"caption is empty": 1}
    assert m["no_caption"] == [{"source": "sub/f.jpg", "reason": "caption is empty"}]
    assert m["caption_rows_unmatched"] == 1 and m["caption_rows_unmatched_examples"] == ["gone.jpg"]
    assert "classes" not in m
    samples = by_source(check_output(out, m))
    assert set(samples) == set(images)
    for rel, data in images.items():
        s = samples[rel]
        ext = os.path.splitext(rel)[1][1:].lower()
        assert s[ext] == data  # the original bytes, never re-encoded
        meta = json.loads(s["json"])
        assert (meta["width"], meta["height"]) == (40, 32) and meta["license"] in ("cc-by", "cc0", "", "x")
    assert samples["a.jpg"]["txt"] == b"a red square"
    assert samples["sub/deeper/d.webp"]["txt"] == b"found by its bare name"
    assert "txt" not in samples["sub/f.jpg"]


def test_folder_with_jsonl_captions_and_columns(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_folder(src, ["x/1.jpg", "x/2.jpg", "y/1.jpg"])
    rows = [{"image": "x/1.jpg", "text": "first", "url": "http://a"},
            {"image": str(src / "x" / "2.jpg"), "text": "absolute path", "score": 0.5},
            {"image": "y/1.jpg", "text": 42},  # not text: kept without caption
            {"image": "x/1.jpg", "text": "a duplicate row: the first one wins"}]
    put(tmp_path / "c.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    m = ingest(src, out, captions_file=tmp_path / "c.jsonl", path_column="image", caption_column="text",
               labels="none", progress=False)
    assert m["num_samples"] == 3 and m["num_captioned"] == 2 and m["caption_rows_duplicate"] == 1
    assert m["no_caption_reasons"] == {"caption is not text": 1}
    samples = by_source(check_output(out, m))
    assert samples["x/1.jpg"]["txt"] == b"first" and json.loads(samples["x/1.jpg"]["json"])["url"] == "http://a"
    assert samples["x/2.jpg"]["txt"] == b"absolute path" and json.loads(samples["x/2.jpg"]["json"])["score"] == 0.5
    # A JSON array of the same objects works too.
    put(tmp_path / "c.json", json.dumps(rows[:2]))
    m = ingest(src, tmp_path / "o2", captions_file=tmp_path / "c.json", path_column="image", caption_column="text",
               labels="none", progress=False)
    assert m["num_captioned"] == 2 and m["no_caption_reasons"] == {"missing caption": 1}


def test_bare_names_shared_by_two_images_are_not_guessed(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_folder(src, ["a/img.jpg", "b/img.jpg", "c/other.jpg"])
    put(tmp_path / "c.csv", "file,caption\nimg.jpg,which one?\nother.jpg,unique\n")
    m = ingest(src, out, captions_file=tmp_path / "c.csv", labels="none", progress=False)
    assert m["num_samples"] == 3 and m["num_captioned"] == 1
    assert all("ambiguous" in item["reason"] for item in m["no_caption"]) and m["num_no_caption"] == 2


def test_captions_from_file_names(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_folder(src, ["red_apple-on-a_table.jpg", "___.jpg"])
    m = ingest(src, out, captions_from="filename", progress=False)
    samples = by_source(check_output(out, m))
    assert samples["red_apple-on-a_table.jpg"]["txt"] == b"red apple on a table"
    assert m["no_caption_reasons"] == {"missing caption": 1} and "txt" not in samples["___.jpg"]


def test_sidecar_captions_are_the_default_and_json_is_merged(tmp_path):
    """img2dataset's "files" output: numbered folders with NAME.jpg, NAME.txt, NAME.json (not class folders)."""
    src, out = tmp_path / "src", tmp_path / "out"
    images = make_folder(src, ["00000/000000000.jpg", "00000/000000001.jpg", "00001/000010000.jpg"])
    for i, rel in enumerate(images):
        stem = rel[:-4]
        put(src / f"{stem}.txt", f"caption {i}\n")
        put(src / f"{stem}.json", json.dumps({"key": stem[-9:], "url": f"http://x/{i}", "status": "success"}))
    put(src / "00000.parquet", b"PAR1")
    put(src / "00000_stats.json", "{}")
    m = ingest(src, out, progress=False)
    assert m["captions"] == "sidecar" and m["num_captioned"] == 3 and "classes" not in m
    assert m["ignored_files"] == {"json": 1, "parquet": 1}
    samples = by_source(check_output(out, m))
    meta = json.loads(samples["00000/000000001.jpg"]["json"])
    assert meta["url"] == "http://x/1" and meta["status"] == "success" and meta["source"] == "00000/000000001.jpg"
    assert meta["key"] == samples["00000/000000001.jpg"]["__key__"]  # the new key; the old one is in source
    assert samples["00000/000000001.jpg"]["txt"] == b"caption 1"


def test_class_folders_give_labels(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_folder(src, ["zebra/1.jpg", "cat/1.jpg", "cat/2.png", "dog/a.jpg", "dog/b.jpg"])
    m = ingest(src, out, progress=False)
    assert m["captions"] == "none" and m["num_captioned"] == 0 and m["num_no_caption"] == 0
    assert m["classes"] == ["cat", "dog", "zebra"] and m["num_classes"] == 3 and m["labels"] == "folder"
    for rel, s in by_source(check_output(out, m)).items():
        meta = json.loads(s["json"])
        assert meta["label"] == rel.split("/")[0] and m["classes"][meta["label_id"]] == meta["label"]
        assert "txt" not in s
    # Shuffled by default (seeded): class-sorted shards would defeat the loader's shuffle buffer.
    order = [json.loads(s["json"])["source"] for s in read_samples(out)]
    assert sorted(order) != order or len(order) < 3
    m2 = ingest(src, tmp_path / "o2", labels="none", shuffle=False, progress=False)
    assert "classes" not in m2
    assert [json.loads(s["json"])["source"] for s in read_samples(tmp_path / "o2")] == sorted(order)
    with pytest.raises(DataToolError, match="directly in SRC"):
        make_folder(src, ["loose.jpg"])
        ingest(src, tmp_path / "o3", labels="folder", progress=False)


def test_corrupt_inputs_are_counted_and_the_rest_ingested(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    good = make_folder(src, ["ok1.jpg", "ok2.png", "nocap.jpg", "badcap.jpg"])
    put(src / "truncated.jpg", image_bytes(size=(64, 64))[:300])
    put(src / "notimage.jpg", b"this is text, not a JPEG")
    put(src / "empty.png", b"")
    for name in ("ok1", "ok2", "truncated", "notimage", "empty"):
        put(src / f"{name}.txt", f"caption of {name}")
    put(src / "badcap.txt", b"\xff\xfe not utf-8 \xc3")
    put(src / "README.md", "not data")
    m = ingest(src, out, progress=False)
    assert m["captions"] == "sidecar" and m["num_inputs"] == 7
    assert m["num_samples"] == 4 and m["num_captioned"] == 2
    assert m["skipped_reasons"] == {"image cannot be decoded": 2, "image is empty": 1}
    assert {s["source"] for s in m["skipped"]} == {"truncated.jpg", "notimage.jpg", "empty.png"}
    assert all(s["reason"] for s in m["skipped"])
    assert m["no_caption_reasons"] == {"missing caption": 1, "caption is not UTF-8": 1}
    assert {s["source"]: s["reason"].split(" (")[0] for s in m["no_caption"]} == \
        {"nocap.jpg": "missing caption", "badcap.jpg": "caption is not UTF-8"}
    assert m["ignored_files"] == {"md": 1}
    samples = by_source(check_output(out, m))
    assert set(samples) == set(good)
    # --require-captions skips the uncaptioned ones instead, still counting why.
    m2 = ingest(src, tmp_path / "strict", require_captions=True, progress=False)
    assert m2["num_samples"] == 2 and m2["num_skipped"] == 5 and m2["num_no_caption"] == 0
    assert m2["skipped_reasons"]["missing caption"] == 1 and m2["skipped_reasons"]["caption is not UTF-8"] == 1


def test_skipped_list_is_capped_but_counts_are_exact(tmp_path):
    src = tmp_path / "src"
    make_folder(src, ["good.jpg"])
    for i in range(5):
        put(src / f"bad{i}.jpg", b"nope")
    m = ingest(src, tmp_path / "out", max_listed=2, progress=False)
    assert m["num_skipped"] == 5 and len(m["skipped"]) == 2 and m["skipped_reasons"] == {"image cannot be decoded": 5}


def img2dataset_shard(path, start, n, *, corrupt=(), no_txt=()):
    files = []
    for i in range(start, start + n):
        key = f"{i:09d}"
        jpg = image_bytes(((50 * i) % 256, 100, 150))
        files.append((f"{key}.jpg", jpg[:200] if i in corrupt else jpg))
        if i not in no_txt:
            files.append((f"{key}.txt", f"caption {i}".encode()))
        files.append((f"{key}.json", json.dumps({"url": f"http://img/{i}.jpg", "caption": f"caption {i}", "key": key,
                                                 "status": "success", "error_message": None, "width": 40,
                                                 "height": 32, "original_width": 400}).encode()))
    return write_tar(path, files)


def test_img2dataset_webdataset_output_is_resharded(tmp_path):
    src, out = tmp_path / "i2d", tmp_path / "out"
    src.mkdir()
    img2dataset_shard(src / "00000.tar", 0, 5, corrupt={2}, no_txt={3})
    img2dataset_shard(src / "00001", 5, 4)
    with open(src / "00001", "rb") as f, gzip.open(src / "00001.tar.gz", "wb") as g:  # compressed sources too
        g.write(f.read())
    os.remove(src / "00001")
    write_tar(src / "00002.tar", [("000000100.json", b"{}"), ("000000101.jpg", image_bytes()),
                                  ("000000101.cls", b"7")])
    put(src / "00000.parquet", b"PAR1")
    put(src / "00000_stats.json", json.dumps({"successes": 5}))
    m = ingest(src, out, samples_per_shard=3, progress=False)
    assert (m["format"], m["captions"]) == ("webdataset", "webdataset")
    assert m["source_shards"] == ["00000.tar", "00001.tar.gz", "00002.tar"]
    assert m["num_inputs"] == 11 and m["num_samples"] == 9 and m["num_shards"] == 3 and m["num_captioned"] == 7
    assert m["skipped_reasons"] == {"image cannot be decoded": 1, "no image": 1}
    assert {s["source"] for s in m["skipped"]} == {"00000.tar:000000002", "00002.tar:000000100"}
    assert m["no_caption"] == [{"source": "00000.tar:000000003", "reason": "missing caption (.txt)"},
                               {"source": "00002.tar:000000101", "reason": "missing caption (.txt)"}]
    samples = by_source(check_output(out, m))
    meta = json.loads(samples["00001.tar.gz:000000006"]["json"])
    assert meta["url"] == "http://img/6.jpg" and meta["status"] == "success" and meta["original_width"] == 400
    assert meta["caption"] == "caption 6" and samples["00001.tar.gz:000000006"]["txt"] == b"caption 6"
    assert samples["00002.tar:000000101"]["cls"] == b"7"  # other members travel unchanged
    # img2dataset's own order is kept (no shuffle for shard sources).
    assert list(samples)[:2] == ["00000.tar:000000000", "00000.tar:000000001"]


def test_unreadable_source_shard_is_counted(tmp_path):
    src = tmp_path / "i2d"
    src.mkdir()
    img2dataset_shard(src / "00000.tar", 0, 3)
    put(src / "00001.tar", os.urandom(2048))
    m = ingest(src, tmp_path / "out", progress=False)
    assert m["num_samples"] == 3 and m["skipped_reasons"] == {"shard not readable": 1}
    assert m["skipped"][0]["source"] == "00001.tar"


def test_workers_give_the_same_shards(tmp_path):
    src = tmp_path / "src"
    make_folder(src, [f"c{i % 2}/{i}.jpg" for i in range(12)])
    put(src / "c0/bad.jpg", b"junk")
    ingest(src, tmp_path / "a", samples_per_shard=5, progress=False)
    m = ingest(src, tmp_path / "b", samples_per_shard=5, workers=2, progress=False)
    assert m["num_samples"] == 12 and m["num_skipped"] == 1
    for name in m["shards"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_errors_say_what_to_fix(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"

    def run(*args):
        code = main(["data", "ingest", *map(str, args)])
        return code, capsys.readouterr()

    code, io_ = run(tmp_path / "nope", "--out", out)
    assert code == 2 and "does not exist" in io_.err
    src.mkdir()
    put(src / "notes.txt", "no images here")
    code, io_ = run(src, "--out", out)
    assert code == 2 and "holds no images" in io_.err
    make_folder(src, ["a.jpg", "b.jpg"])
    code, io_ = run(src, "--out", out, "--captions", tmp_path / "missing.csv")
    assert code == 2 and "missing.csv" in io_.err and "does not exist" in io_.err
    put(tmp_path / "c.csv", "path,text\na.jpg,hello\n")
    code, io_ = run(src, "--out", out, "--captions", tmp_path / "c.csv")
    assert code == 2 and "no 'file' or 'caption' column" in io_.err and "'path', 'text'" in io_.err
    assert "--path-column" in io_.err and not out.exists()
    code, io_ = run(src, "--out", out, "--captions", tmp_path / "c.csv", "--path-column", "path", "--caption-column",
                    "wrong")
    assert code == 2 and "no 'wrong' column" in io_.err
    put(tmp_path / "d.csv", "file,caption\nelsewhere/z.jpg,hello\n")
    code, io_ = run(src, "--out", out, "--captions", tmp_path / "d.csv")
    assert code == 2 and "no row of d.csv names an image" in io_.err

    code, io_ = run(src, "--out", out, "--captions", tmp_path / "c.csv", "--path-column", "path", "--caption-column",
                    "text", "--samples-per-shard", "1")
    assert code == 0 and "Ingested 2 of 2 sample(s)" in io_.out and "1 captioned" in io_.out
    assert sorted(f for f in os.listdir(out) if f.endswith(".tar")) == ["shard-00000.tar", "shard-00001.tar"]
    code, io_ = run(src, "--out", out, "--captions-from", "none")
    assert code == 2 and "already holds 2 shard(s)" in io_.err and "--overwrite" in io_.err
    os.remove(src / "b.jpg")
    code, io_ = run(src, "--out", out, "--captions-from", "none", "--overwrite")
    assert code == 0
    assert sorted(os.listdir(out)) == ["manifest.json", "shard-00000.idx", "shard-00000.idx.json", "shard-00000.tar"]
    code, io_ = run(src, "--out", src)
    assert code == 2 and "SRC itself" in io_.err


def test_an_interrupted_ingest_leaves_no_partial_shard(tmp_path, monkeypatch):
    """A shard streams into an atomic temporary file: an error mid-shard removes it (the shards before it stay, and
    manifest.json is not written); the temporary files a killed ingest left are removed by the next one."""
    import fastenc.datatools.ingest as ingest_module

    src, out = tmp_path / "src", tmp_path / "out"
    make_folder(src, [f"{i}.jpg" for i in range(5)])
    calls, add_file = [], ingest_module._add_file

    def failing_add_file(tar, name, data):
        calls.append(name)
        if len(calls) == 9:  # 2 members (image, json) per sample, 3 samples per shard: in the second shard
            raise KeyboardInterrupt
        add_file(tar, name, data)

    monkeypatch.setattr(ingest_module, "_add_file", failing_add_file)
    with pytest.raises(KeyboardInterrupt):
        ingest(src, out, samples_per_shard=3, captions_from="none", progress=False)
    assert sorted(os.listdir(out)) == ["shard-00000.idx", "shard-00000.idx.json", "shard-00000.tar"]
    monkeypatch.undo()

    put(temp_name(str(out / "shard-00001.tar")), b"what a killed ingest left")
    put(temp_name(str(out / "manifest.json")), b"{")
    put(out / ".notes.tmp.txt", "someone else's hidden file")
    m = ingest(src, out, samples_per_shard=3, captions_from="none", progress=False, overwrite=True)
    assert m["num_samples"] == 5 and sorted(f for f in os.listdir(out) if f.startswith(".")) == [".notes.tmp.txt"]
    os.remove(out / ".notes.tmp.txt")
    check_output(out, m)


def test_nothing_usable_exits_1(tmp_path, capsys):
    src = tmp_path / "src"
    put(src / "a.jpg", b"junk")
    assert main(["data", "ingest", str(src), "--out", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert "Ingested 0 of 1" in out and "Skipped 1 (1 image cannot be decoded)" in out


def test_dali_reads_ingested_shards(tmp_path):
    pytest.importorskip("nvidia.dali", reason="nvidia.dali is not installed: the DALI backend is optional")
    from fastenc.data.dali import DaliLoader
    from fastenc.data.spec import ImageTextSpec

    src, out = tmp_path / "src", tmp_path / "out"
    images = make_folder(src, [f"{i}.jpg" for i in range(10)] + ["p.png"])
    for rel in images:
        put(src / (rel.rsplit(".", 1)[0] + ".txt"), f"caption for {rel}")
    put(src / "bad.jpg", b"junk")
    ingest(src, out, samples_per_shard=4, progress=False)
    loader = DaliLoader(str(out), ImageTextSpec(32), batch_size=4, num_threads=1, shuffle_buffer=1)
    batch = next(loader)
    assert tuple(batch["image"].shape) == (4, 3, 32, 32)
    assert len(batch["caption"]) == 4 and all(c.startswith("caption for ") for c in batch["caption"])
    assert loader.num_excluded == 0  # ingest left the bad image out before indexing
