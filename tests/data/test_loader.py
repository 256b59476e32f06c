import io
import itertools
import os
import shutil
import tarfile

import pytest
import torch

pytest.importorskip("webdataset")

from fastenc.data.collate import CaptionCollate  # noqa: E402
from fastenc.data.loader import build_loader  # noqa: E402
from fastenc.datatools.synth import render_sample  # noqa: E402
from fastenc.data.tokenizer import Tokenizer  # noqa: E402
from fastenc.data.transforms import CaptionSample, decode_caption, decode_image, image_transform  # noqa: E402

from .conftest import NUM_SYNTH, write_tar  # noqa: E402


class IndexSample:
    """sample_fn that decodes like CaptionSample but returns the sample's integer key, to track exactly which
    samples came through."""

    def __call__(self, sample):
        decode_image(sample["jpg"])
        decode_caption(sample["txt"])
        return {"index": torch.tensor(int(sample["__key__"]))}


def _indices(loader, max_batches=None):
    batches = list(itertools.islice(loader, max_batches))
    idx = torch.cat([b["index"] for b in batches]).tolist()
    return idx, sum(int(b["num_skipped"]) for b in batches), batches


def _jpeg(i):
    buf = io.BytesIO()
    render_sample(i, image_size=32)[0].save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def corrupt_dir(tmp_path_factory):
    """Two shards of 12 good samples each plus 5 corrupt samples (indices >= 100)."""
    d = tmp_path_factory.mktemp("corrupt")
    good = lambda i: [(f"{i:09d}.jpg", _jpeg(i)), (f"{i:09d}.txt", f"caption {i}".encode())]  # noqa: E731
    bad_jpg = _jpeg(100)
    write_tar(d / "shard-00000.tar", [f for i in range(0, 6) for f in good(i)]
              + [("000000100.jpg", bad_jpg[: len(bad_jpg) // 2]), ("000000100.txt", b"truncated jpeg")]
              + [f for i in range(6, 12) for f in good(i)]
              + [("000000101.jpg", b"<html>not an image</html>"), ("000000101.txt", b"not an image")])
    write_tar(d / "shard-00001.tar", [f for i in range(12, 18) for f in good(i)]
              + [("000000102.jpg", _jpeg(102))]  # no .txt
              + [("000000103.jpg", _jpeg(103)), ("000000103.txt", "légende".encode("latin-1"))]
              + [f for i in range(18, 24) for f in good(i)]
              + [("000000104.jpg", _jpeg(104)), ("000000104.txt", b"")])
    return str(d)


def test_batches_shapes_and_dtypes(synth_dir, tokenizer_model):
    tok = Tokenizer(tokenizer_model, 32)
    for pad_to_longest, num_workers in ((False, 0), (True, 1)):
        loader = build_loader(synth_dir, sample_fn=CaptionSample(image_transform(32, train=True)), batch_size=8,
                              num_workers=num_workers, shuffle_buffer=50,
                              collate_fn=CaptionCollate(tok, pad_to_longest=pad_to_longest, multiple_of=4))
        for batch in itertools.islice(loader, 3):
            assert set(batch) == {"image", "text", "num_skipped"}
            assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32
            L = batch["text"].shape[1]
            assert batch["text"].shape == (8, L) and batch["text"].dtype == torch.int64
            longest = int((batch["text"] != tok.pad_id).sum(1).max())
            assert L == (min(32, -(-longest // 4) * 4) if pad_to_longest else 32)
            assert (batch["text"] == tok.eos_id).sum() == 8
            assert batch["num_skipped"].shape == () and batch["num_skipped"].dtype == torch.int64
            assert batch["num_skipped"] == 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_samples_are_skipped_and_counted(corrupt_dir, num_workers):
    loader = build_loader(corrupt_dir, sample_fn=IndexSample(), batch_size=5, num_workers=num_workers,
                          resampled=False, drop_last=False, shuffle_buffer=10)
    idx, skipped, batches = _indices(loader)
    assert sorted(idx) == list(range(24)) and skipped == 5
    # drop_last: only full batches
    loader = build_loader(corrupt_dir, sample_fn=IndexSample(), batch_size=5, num_workers=0, resampled=False)
    assert all(len(b["index"]) == 5 for b in loader)


def test_broken_shard_is_skipped_and_counted_once(corrupt_dir, tmp_path):
    src = os.path.join(corrupt_dir, "shard-00000.tar")
    with tarfile.open(src) as tar:
        cut = tar.getmember("000000003.jpg").offset_data + 100  # inside sample 3's image data
    with open(src, "rb") as f:
        (tmp_path / "shard-00000.tar").write_bytes(f.read(cut))
    shutil.copy(os.path.join(corrupt_dir, "shard-00001.tar"), tmp_path)
    with pytest.warns(UserWarning, match="1 shard.* look truncated.*shard-00000.tar"):
        loader = build_loader(tmp_path, sample_fn=IndexSample(), batch_size=1, num_workers=0, resampled=False)
    idx, skipped, _ = _indices(loader)
    assert sorted(idx) == [0, 1, 2] + list(range(12, 24))
    assert skipped == 1 + 3  # the broken shard once, plus shard 1's three corrupt samples


def test_resampled_streams_differ_by_rank_and_are_reproducible(synth_dir):
    def stream(rank, epoch=0, seed=0):
        loader = build_loader(synth_dir, sample_fn=IndexSample(), batch_size=16, num_workers=0, seed=seed,
                              rank=rank, world_size=2, epoch=epoch, shuffle_buffer=20)
        return _indices(loader, max_batches=20)[0]

    rank0 = stream(0)
    assert len(rank0) == 320 > NUM_SYNTH  # infinite stream: goes past one epoch
    assert stream(0) == rank0
    assert stream(1) != rank0 and stream(0, epoch=1) != rank0 and stream(0, seed=1) != rank0


def test_resampled_workers_differ(synth_dir):
    loader = build_loader(synth_dir, sample_fn=IndexSample(), batch_size=16, num_workers=2, shuffle_buffer=20)
    batches = list(itertools.islice(loader, 4))  # workers alternate: batches 0, 2 from worker 0; 1, 3 from 1
    assert not torch.equal(batches[0]["index"], batches[1]["index"])


def test_epoch_split_is_disjoint_across_ranks(synth_dir):
    seen = []
    for rank in range(2):
        loader = build_loader(synth_dir, sample_fn=IndexSample(), batch_size=4, num_workers=0, resampled=False,
                              rank=rank, world_size=2, drop_last=False)
        seen.append(set(_indices(loader)[0]))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(NUM_SYNTH))


def test_too_few_shards_without_resampling(corrupt_dir):
    with pytest.raises(ValueError, match="2 shards cannot be split over 2 rank.*x 2 worker"):
        build_loader(corrupt_dir, sample_fn=IndexSample(), batch_size=4, num_workers=2, resampled=False,
                     world_size=2)


def _always_fails(sample):
    raise KeyError("jpeg")


def test_nothing_succeeds_is_an_error(corrupt_dir):
    loader = build_loader(corrupt_dir, sample_fn=_always_fails, batch_size=4, num_workers=0,
                          max_consecutive_skips=50)
    with pytest.raises(RuntimeError, match="50 consecutive samples or shards failed.*KeyError"):
        next(iter(loader))
