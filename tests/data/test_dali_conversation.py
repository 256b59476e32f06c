"""The DALI path for ConversationSpec: eval images as the torch path makes them, the .json records as text, epochs
that count only samples with a .json, and bad records skipped and counted by ConversationCollate.finish."""

import io
import json
import logging
import tarfile

import numpy as np
import pytest

pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install nvidia-dali-cuda130)")

from fastenc.data.dali import DaliLoader  # noqa: E402
from fastenc.data.index import build_index  # noqa: E402
from fastenc.data.spec import ConversationSpec  # noqa: E402
from fastenc.data.transforms import decode_image, image_transform  # noqa: E402
from fastenc.datatools.synth import render_sample  # noqa: E402

SIZE = 32
NUM = 24
NO_JSON = "000000007b"  # an image without a conversation: never delivered, not counted
BAD_IMAGE = "000000015b"  # a truncated JPEG with a conversation: left out by the index validation
# The mean bound of the backends' eval-transform parity on photographs (tests/data/test_eval_photos.py): resampling
# noise (the JPEG decoders agree here; the two bicubic resizes do not, quite) stays well under it, while a crop placed
# a fraction of a pixel off, or a long side rounded differently, gives 1.8-11 levels on these images. At 32 px the
# synthetic images' hard edges make single values differ more than on photographs: up to 14 levels over 400 of them
# (measured), and a shifted crop gives up to ~130.
MEAN_LEVELS, MAX_LEVELS = 0.5, 24
# Width x height of the encoded images, cycled: landscape, portrait and square, so the resize + center crop matters.
SHAPES = [(64, 48), (40, 64), (64, 64), (61, 37)]


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg(index):
    img, attrs = render_sample(index, image_size=64)
    w, h = SHAPES[index % len(SHAPES)]
    buf = io.BytesIO()
    img.crop((0, 0, w, h)).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), attrs


def _record(key, attrs):
    return {"id": key, "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": attrs["color"]},
        {"from": "human", "value": "Which shape is it?"}, {"from": "gpt", "value": attrs["category"]}]}


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """(shard path, {json text: jpeg bytes}) of NUM conversation samples, plus one without a .json and one whose
    image is truncated; indexed with validation."""
    path = str(tmp_path_factory.mktemp("conv") / "conv-000.tar")
    samples = {}
    with tarfile.open(path, "w") as tar:
        for i in range(NUM):
            key = f"{i:09d}"
            jpg, attrs = _jpeg(i)
            text = json.dumps(_record(key, attrs))
            samples[text] = jpg
            _add(tar, f"{key}.jpg", jpg)
            _add(tar, f"{key}.json", text.encode())
            if key + "b" == NO_JSON:
                _add(tar, f"{NO_JSON}.jpg", _jpeg(100)[0])
                _add(tar, f"{NO_JSON}.txt", b"an image without a conversation")
            if key + "b" == BAD_IMAGE:
                jpg, attrs = _jpeg(101)
                _add(tar, f"{BAD_IMAGE}.jpg", jpg[: len(jpg) // 2])
                _add(tar, f"{BAD_IMAGE}.json", json.dumps(_record(BAD_IMAGE, attrs)).encode())
    rep = build_index(path)
    assert rep.num_samples == NUM + 1 and [e["key"] for e in rep.excluded] == [BAD_IMAGE]
    return path, samples


def _epoch(loader):
    _, batches = loader._epoch_layout(loader.epoch)
    return [next(loader) for _ in range(batches)]


def test_images_and_conversations_match_the_torch_path(shard):
    path, samples = shard
    loader = DaliLoader(path, ConversationSpec(SIZE), batch_size=8, num_threads=1, device="cpu", shuffle_buffer=1,
                        resampled=False)
    assert loader.sizes == {path: NUM} and loader.num_excluded == 2  # the truncated image, the sample without .json
    batches = _epoch(loader)
    assert len(batches) == NUM // 8
    reference = image_transform(SIZE, train=False, normalize=False)
    seen, report, bad = [], [], []
    for b in batches:
        assert set(b) == {"image", "conversation", "num_skipped"} and int(b["num_skipped"]) == 0
        assert b["image"].shape == (8, 3, SIZE, SIZE) and len(b["conversation"]) == 8
        for text, image in zip(b["conversation"], b["image"]):
            assert text in samples, text  # the .json's bytes, as text
            seen.append(json.loads(text)["id"])
            ref = reference(decode_image(samples[text]))
            assert ref.shape == image.shape and ref.dtype == image.dtype
            diff = (image.int() - ref.int()).abs().float()
            mean, peak = diff.mean().item(), diff.max().item()
            report.append(f"{seen[-1]}: mean {mean:.2f}, max {peak:.0f}")
            if mean >= MEAN_LEVELS or peak > MAX_LEVELS:
                bad.append(seen[-1])
    assert not bad, "DALI and torch eval images disagree:\n" + "\n".join(report)
    # shuffle_buffer=1, one shard: the epoch is the shard in order, every conversation once, nothing else
    assert seen == [f"{i:09d}" for i in range(NUM)]


def test_an_index_without_report_counts_only_samples_with_a_json(shard, tmp_path, caplog):
    """wds2idx's index (no validation, no report): the sample without .json is not counted; the truncated image is
    (it has a .json), fails its batch in DALI, and the recovery path (reader-only replay) leaves it out."""
    import wds2idx

    path, samples = shard
    with wds2idx.IndexCreator(path, str(tmp_path / "conv-000.idx"), verbose=False) as ic:
        ic.create_index()
    loader = DaliLoader(path, ConversationSpec(SIZE), batch_size=8, num_threads=1, device="cpu", shuffle_buffer=1,
                        resampled=False, index_dir=str(tmp_path), work_dir=str(tmp_path / "work"))
    assert loader.sizes == {path: NUM + 1} and loader.num_excluded == 0
    with caplog.at_level(logging.WARNING):
        batches = _epoch(loader)  # 25 // 8 = 3 batches; the truncated image is the 17th sample read
    assert loader.num_recoveries == 1 and loader._bad == {path: {f"{BAD_IMAGE}.jpg"}}
    assert BAD_IMAGE in caplog.text
    assert sum(int(b["num_skipped"]) for b in batches) == 1
    texts = [t for b in batches for t in b["conversation"]]
    assert len(texts) == 24 and all(t in samples for t in texts)


def test_bad_records_are_counted_skips_in_the_collate(tmp_path, caplog):
    pytest.importorskip("transformers", reason="the vision-language stage needs transformers (make setup)")
    from fastenc.data.collate import ConversationCollate
    from fastenc.data.conversation import IGNORE, VICUNA_V1, ConversationEncoder
    from fastenc.models.language import IMAGE, train_chat_tokenizer

    path = str(tmp_path / "bad-000.tar")
    records = []
    with tarfile.open(path, "w") as tar:
        for i in range(8):
            key = f"{i:09d}"
            jpg, attrs = _jpeg(i)
            record = json.dumps(_record(key, attrs)).encode()
            if i == 2:
                record = record.replace(b"What color", b"What \xff\xfe color")  # JSON, but not UTF-8
            elif i == 5:
                record = record[: len(record) // 2]  # UTF-8, not JSON
            elif i == 6:
                record = b'{"id": "no conversations"}'
            records.append(record)
            _add(tar, f"{key}.jpg", jpg)
            _add(tar, f"{key}.json", record)
    build_index(path)
    texts = [t["value"] for r in records[:2] for t in json.loads(r)["conversations"]] * 20
    tokenizer = train_chat_tokenizer(texts, vocab_size=300)
    encoder = ConversationEncoder(tokenizer, VICUNA_V1, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
                                  num_image_tokens=16, max_length=512)
    collate = ConversationCollate(tokenizer.pad_token_id, encoder=encoder)
    loader = DaliLoader(path, ConversationSpec(SIZE), batch_size=8, num_threads=1, device="cpu", shuffle_buffer=1,
                        resampled=False, finish=collate.finish)
    with caplog.at_level(logging.WARNING):
        batch = next(loader)
    assert "not UTF-8" in caplog.text
    assert int(batch["num_skipped"]) == 3
    assert batch["image"].shape == (5, 3, SIZE, SIZE) and batch["input_ids"].shape[0] == 5
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[1] % 8 == 0
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    assert ((batch["input_ids"] == image_id).sum(1) == 16).all()
    assert ((batch["labels"] != IGNORE).sum(1) > 0).all()
    # the raw (unfinished) batch: the non-UTF-8 record arrives as "" (rejected as the torch path rejects its bytes)
    raw = next(DaliLoader(path, ConversationSpec(SIZE), batch_size=8, num_threads=1, device="cpu", shuffle_buffer=1,
                          resampled=False))
    assert raw["conversation"][2] == "" and raw["conversation"][5] == records[5].decode()
    assert [t.encode() for i, t in enumerate(raw["conversation"]) if i != 2] == records[:2] + records[3:]
    assert np.array_equal(raw["image"][0].numpy(), batch["image"][0].numpy())
