"""Run open_clip's own trainer (open_clip_train.main) on a model config JSON that is not in open_clip's registry.

    python benchmarks/open_clip_peer.py --model-config PATH.json [--vocab-size N] -- <open_clip_train.main args>

The JSON is registered with open_clip.add_model_config and its file stem becomes the `--model` name. Nothing of
open_clip's training loop is changed. Three adaptations, each announced on stdout:

The tokenizer: open_clip only knows its own 49408-token BPE vocabulary, while the fastenc CPU recipes train a
small sentencepiece one (about 100 pieces for the synthetic captions). A 49408 x 256 token embedding would add
12.6 M parameters (more than both towers together) to the optimizer step, so the peer keeps fastenc's vocabulary
size and folds the BPE ids into it: SOT/EOT map to the two largest ids, so that open_clip's argmax pooling still
lands on the EOT token, and every other id to id % (vocab - 2). The compute per step is then
exactly that of a tokenizer with this vocabulary; the captions' meaning is irrelevant to a speed measurement.

open_clip_train.data imports pandas at module level, for its CSV dataset only; pandas is not among fastenc's
pinned dependencies. When it is missing, open_clip_train.data is imported with a stand-in module that raises on
any use (and the run says so on stdout): the synthetic dataset used here never touches it.

open_clip_train 3.3.0 groups tar members for training with its own `group_by_keys_nothrow`, written before
webdataset (1.0.2 here) began yielding an empty end-of-shard marker from `tar_file_expander`; every webdataset
training run then dies with KeyError: 'fname'. `--wds-no-eof-marker` (used for the shards peer) binds
open_clip_train.data's `tar_file_expander` with eof_value=None, the behaviour that code was written against;
the marker only keeps samples of two shards from merging, which cannot happen with distinct keys per shard.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


def folded_tokenizer(tokenizer, vocab_size: int):
    """Wrap an open_clip tokenizer so that its ids lie in [0, vocab_size), EOT staying the largest id."""
    import torch

    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id

    def tokenize(texts, context_length=None):
        ids = tokenizer(texts) if context_length is None else tokenizer(texts, context_length)
        out = torch.remainder(ids, vocab_size - 2)
        out[ids == 0] = 0  # padding stays 0
        out[ids == sot] = vocab_size - 2
        out[ids == eot] = vocab_size - 1
        return out

    return tokenize


def _import_open_clip_train_main():
    """Import open_clip_train.main; without pandas, with a stand-in present only while open_clip_train.data loads."""
    try:
        import pandas  # noqa: F401
    except ImportError:
        import importlib.machinery
        import types

        stub = types.ModuleType("pandas")
        stub.__spec__ = importlib.machinery.ModuleSpec("pandas", None)

        def _missing(name):
            if name.startswith("__"):  # module introspection must see a plain module
                raise AttributeError(name)
            raise ImportError(f"pandas.{name}: pandas is not installed (benchmark stand-in; pip install pandas)")

        stub.__getattr__ = _missing
        sys.modules["pandas"] = stub
        try:
            import open_clip_train.data  # noqa: F401  (binds the stand-in as its `pd`)
        finally:
            del sys.modules["pandas"]  # later availability checks see pandas as absent, as it is
        print("open_clip_peer: pandas not installed; stand-in module bound in open_clip_train.data (only its CSV "
              "dataset uses pandas)", flush=True)
    import open_clip_train.main

    return open_clip_train.main


def main(argv: list[str]) -> int:
    if "--" not in argv:
        raise SystemExit("usage: open_clip_peer.py --model-config PATH.json [--vocab-size N] -- <open_clip_train args>")
    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-config", required=True)
    parser.add_argument("--wds-no-eof-marker", action="store_true",
                        help="compatibility of open_clip_train 3.3.0 with webdataset's end-of-shard marker")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="fold token ids into this vocabulary (default: the JSON's text_cfg.vocab_size)")
    args = parser.parse_args(argv[:split])
    train_argv = argv[split + 1:]

    import json

    import open_clip
    import torch

    oc_main = _import_open_clip_train_main()
    if args.wds_no_eof_marker:
        import functools
        import inspect

        import open_clip_train.data as oc_data

        if "eof_value" in inspect.signature(oc_data.tar_file_expander).parameters:
            oc_data.tar_file_expander = functools.partial(oc_data.tar_file_expander, eof_value=None)
            print("open_clip_peer: webdataset end-of-shard marker disabled for open_clip_train.data", flush=True)

    open_clip.add_model_config(args.model_config)
    with open(args.model_config) as f:
        vocab = args.vocab_size or json.load(f)["text_cfg"].get("vocab_size", 49408)
    if vocab < 49408:
        real_get_tokenizer = oc_main.get_tokenizer
        oc_main.get_tokenizer = lambda *a, **k: folded_tokenizer(real_get_tokenizer(*a, **k), vocab)
        print(f"open_clip_peer: token ids folded into a vocabulary of {vocab}", flush=True)
    # The parent reads these lines to record the peer's real settings (thread count, parameter count).
    print(f"open_clip_peer: torch threads {torch.get_num_threads()}, interop {torch.get_num_interop_threads()}",
          flush=True)
    real_create = oc_main.create_model_and_transforms

    def create_and_count(*a, **k):
        model, pre_train, pre_val = real_create(*a, **k)
        print(f"open_clip_peer: params {sum(p.numel() for p in model.parameters())}", flush=True)
        return model, pre_train, pre_val

    oc_main.create_model_and_transforms = create_and_count
    try:
        return oc_main.main(train_argv) or 0
    finally:
        # Peak resident memory of this training process (loader workers excluded).
        print(f"open_clip_peer: peak rss {harness.peak_rss_mb():.1f} MiB", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
