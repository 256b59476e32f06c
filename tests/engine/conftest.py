"""A tiny synthetic shard set + tokenizer shared by the engine and objective tests (made once per session)."""

import io
import os
import tarfile

import pytest

TINY = [
    "model.name=vit_test",
    "objective.embed_dim=32",
    "objective.text.name=text_test",
    "data.batch_size=16",
    "data.num_workers=0",
    "data.shuffle_buffer=64",
    "data.synth.num_samples=0",
    "engine.log_every=1",
    "engine.tensorboard=false",
    "schedule.warmup_steps=2",
    "optim.lr=2e-3",
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from fastenc.data.synth import write_synthetic_shards
    from fastenc.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("synth")
    shards = root / "shards"
    write_synthetic_shards(str(shards), 512, image_size=32, seed=0, samples_per_shard=128, progress=False)
    tok = train_tokenizer(str(shards), str(root / "tok"), vocab_size=300)
    return {"shards": str(shards), "tokenizer": tok, "root": root}


@pytest.fixture(scope="session")
def corrupt_shard(tiny_data):
    """One extra shard with 4 corrupt (truncated JPEG, text in .jpg, no .txt, non-UTF-8) then 4 good samples.

    Corrupt first: a skip is reported with the next full batch, so good samples must follow the bad ones."""
    src = os.path.join(tiny_data["shards"], "shard-00000.tar")
    out = os.path.join(tiny_data["root"], "corrupt")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "shard-corrupt.tar")
    with tarfile.open(src) as t:
        members = {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}
    keys = sorted({n.split(".")[0] for n in members})[:8]
    with tarfile.open(path, "w") as t:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))

        for i, k in enumerate(keys):
            jpg, txt, js = members[f"{k}.jpg"], members[f"{k}.txt"], members[f"{k}.json"]
            if i == 0:
                jpg = jpg[: len(jpg) // 3]
            if i == 1:
                jpg = b"this is not an image"
            if i == 3:
                txt = b"\xff\xfe caption \xc3\x28"
            add(f"c{k}.jpg", jpg)
            if i != 2:
                add(f"c{k}.txt", txt)
            add(f"c{k}.json", js)
    return path


def tiny_overrides(tiny_data, tmp_path, *extra):
    return TINY + [f"data.train_shards={tiny_data['shards']}", f"objective.tokenizer={tiny_data['tokenizer']}",
                   f"run.output_dir={tmp_path}", *extra]
