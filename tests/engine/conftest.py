"""A tiny synthetic shard set + tokenizer shared by the engine and objective tests (made once per session)."""

import io
import os
import pickle
import tarfile
import tempfile
import traceback

import pytest
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
    from fastenc.datatools.synth import write_synthetic_shards
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


def _isolated_child(fn, args, kwargs, out):
    try:
        result = fn(*args, **kwargs)
        with open(out, "wb") as f:
            pickle.dump(result, f)
    except BaseException:  # noqa: BLE001 - reported by the parent
        with open(out + ".err", "w") as f:
            f.write(traceback.format_exc())
        raise


def _train(recipe, overrides, **kwargs):
    from fastenc.config import load_config
    from fastenc.engine.trainer import train

    return train(load_config(os.path.join(ROOT, recipe), overrides), **kwargs)


_CTX = None


def _context():
    # forkserver: children fork from a clean server that imported the trainer once (cheap), never from the pytest
    # process, whose OpenMP pool (after any torch op) would deadlock a plain fork child.
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["fastenc.engine.trainer", "deepspeed"])
    return _CTX


def run_isolated(fn, *args, timeout=600, **kwargs):
    """fn(*args, **kwargs) in a child process, its (picklable) result returned: the process group, DeepSpeed's
    global state and the env vars a world-of-one run sets stay out of the pytest process (other tests fork gloo
    ranks of their own). fn must be importable by name (a module-level function)."""
    out = tempfile.mktemp(suffix=".pkl")
    proc = _context().Process(target=_isolated_child, args=(fn, args, kwargs, out))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        raise AssertionError(f"{fn.__name__} did not finish within {timeout} s")
    if os.path.exists(out + ".err"):
        raise AssertionError(f"{fn.__name__} failed in the child process:\n" + open(out + ".err").read())
    assert proc.exitcode == 0, f"{fn.__name__} child exited with {proc.exitcode}"
    with open(out, "rb") as f:
        return pickle.load(f)


def train_isolated(recipe, overrides, timeout=600, **kwargs):
    """Run fastenc's trainer in a child process (see run_isolated); returns its TrainResult."""
    return run_isolated(_train, recipe, list(overrides), timeout=timeout, **kwargs)
