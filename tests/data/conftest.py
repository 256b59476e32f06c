"""Fixtures shared by the data tests (and tests/datatools): one small synthetic shard set and one tokenizer."""

import io
import os
import tarfile

import pytest

NUM_SYNTH = 240
SYNTH_PER_SHARD = 40  # 6 shards: enough for 2 ranks x 2 workers without resampling


def write_tar(path, files):
    """Write a tar of (name, bytes) pairs, in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    from fastenc.datatools.synth import write_synthetic_shards

    out = tmp_path_factory.mktemp("synth")
    write_synthetic_shards(out, NUM_SYNTH, samples_per_shard=SYNTH_PER_SHARD, seed=0, progress=False)
    return str(out)


@pytest.fixture(scope="session")
def tokenizer_model(synth_dir, tmp_path_factory):
    from fastenc.data.tokenizer import train_tokenizer

    prefix = os.path.join(str(tmp_path_factory.mktemp("tok")), "captions")
    return train_tokenizer(synth_dir, prefix, vocab_size=64)
