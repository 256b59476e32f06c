import logging
import os
import pickle
import shutil

import pytest
import torch

pytest.importorskip("sentencepiece")

from fastenc.data.tokenizer import Tokenizer, iter_captions, train_tokenizer  # noqa: E402

from .conftest import write_tar  # noqa: E402

CAPTION = 'a photo of a red star with the word "moon" written on it'


def test_trained_model_ids_and_roundtrip(tokenizer_model):
    tok = Tokenizer(tokenizer_model, context_length=64)
    assert (tok.pad_id, tok.eos_id, tok.context_length) == (0, 3, 64)
    assert 20 < tok.vocab_size <= 64
    row = tok(CAPTION)[0]
    assert row[-1] == tok.pad_id  # fits, so not truncated
    assert tok.decode(row) == CAPTION
    assert tok.decode(tok([CAPTION.upper().lower()])[0]) == CAPTION


def test_padding_eos_and_truncation(tokenizer_model):
    tok = Tokenizer(tokenizer_model, context_length=12)
    ids = tok(["a star", "a red circle", CAPTION * 5])
    assert ids.shape == (3, 12) and ids.dtype == torch.long
    n = int((ids[0] != tok.pad_id).sum())
    assert ids[0, n - 1] == tok.eos_id and (ids[0, n:] == tok.pad_id).all() and n < 12
    assert (ids[0, : n - 1] != tok.eos_id).all()  # exactly one EOS, then padding
    assert ids[2, -1] == tok.eos_id and (ids[2] != tok.pad_id).all()  # truncated: EOS kept as last token
    assert tok.decode(ids[2]) == tok.decode(tok(CAPTION * 5)[0])
    assert tok("a star").shape == (1, 12)


def test_pad_to_longest(tokenizer_model):
    tok = Tokenizer(tokenizer_model, context_length=40)
    captions = ["a star", "a red circle", CAPTION]
    full = tok(captions)
    n = int((full != tok.pad_id).sum(1).max())  # longest row, EOS included
    exact = tok(captions, pad_to_longest=True)
    assert exact.shape == (3, n) and torch.equal(exact, full[:, :n]) and (full[:, n:] == tok.pad_id).all()
    rounded = tok(captions, pad_to_longest=True, multiple_of=8)
    assert rounded.shape == (3, -(-n // 8) * 8) and torch.equal(rounded, full[:, : rounded.shape[1]])
    assert tok(["a star"], pad_to_longest=True, multiple_of=64).shape == (1, 40)  # never beyond context_length
    truncated = tok([CAPTION * 5, "a star"], pad_to_longest=True, multiple_of=8)
    assert torch.equal(truncated, tok([CAPTION * 5, "a star"]))  # the cut row already fills the context
    with pytest.raises(ValueError, match="multiple_of"):
        tok(captions, pad_to_longest=True, multiple_of=0)


def test_pickle_roundtrip_needs_no_file(tokenizer_model, tmp_path):
    path = shutil.copy(tokenizer_model, tmp_path / "copy.model")
    tok = Tokenizer(path, context_length=16)
    blob = pickle.dumps(tok)
    os.remove(path)  # workers rebuild from the pickled model proto, not from the file
    clone = pickle.loads(blob)
    assert torch.equal(clone([CAPTION, "a ring"]), tok([CAPTION, "a ring"]))
    assert clone.vocab_size == tok.vocab_size


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="fastenc tokenizer train --shards"):
        Tokenizer(tmp_path / "nope.model", context_length=16)


def test_model_types(synth_dir, tmp_path):
    for model_type in ("bpe", "unigram"):
        tok = Tokenizer(train_tokenizer(synth_dir, tmp_path / model_type, vocab_size=60, model_type=model_type), 128)
        assert tok.decode(tok(CAPTION)[0]) == CAPTION
    with pytest.raises(ValueError, match="model_type must be one of"):
        train_tokenizer(synth_dir, tmp_path / "x", model_type="wordpiece")


def test_vocab_too_large_is_lowered(synth_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fastenc.data.tokenizer"):
        path = train_tokenizer(synth_dir, tmp_path / "big", vocab_size=5000, model_type="bpe")
    assert path == str(tmp_path / "big.model") and os.path.isfile(path)
    assert "too small for vocab_size=5000" in caplog.text
    tok = Tokenizer(path, 16)
    assert tok.vocab_size < 5000 and tok.decode(tok(CAPTION)[0]) == CAPTION


def test_bad_captions_are_skipped_and_counted(tmp_path):
    shard = write_tar(tmp_path / "s.tar", [("0.txt", b"a red star"), ("1.txt", b"caf\xe9"), ("2.txt", b"  "),
                                           ("3.txt", b"a blue ring"), ("3.jpg", b"...")])
    stats = {}
    assert sorted(iter_captions(shard, stats=stats)) == ["a blue ring", "a red star"]
    assert stats == {"num_captions": 2, "num_not_utf8": 1, "num_empty": 1, "num_read_errors": 0}
    empty = write_tar(tmp_path / "e.tar", [("0.jpg", b"...")])
    with pytest.raises(ValueError, match="no usable .txt captions"):
        train_tokenizer(empty, tmp_path / "e")
