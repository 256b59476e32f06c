"""Language models for the vision-language stage: Hugging Face causal LMs, and small presets for CPU recipes.

A real stage loads a causal LM and its tokenizer from a local directory with `transformers` (no network). The CPU
recipes and the tests need one that does not exist on disk yet: `train_chat_tokenizer` fits a byte-level BPE on the
recipe's captions (a fast tokenizer, so it reports the character offsets that place the labels exactly,
fastenc.data.conversation) and a preset (LM_PRESETS) sizes a randomly initialized Llama for it.
"""

from __future__ import annotations

from fastenc.utils.optional import require

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
IMAGE = "<image>"

LM_PRESETS = {
    "llama_tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=1024),
    "llama_1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, max_position_embeddings=2048),
}
"""Llama shapes by name: llama_tiny for CPU recipes and tests; llama_1b the TinyLlama-1.1B shape (GPU throughput)."""


def train_chat_tokenizer(texts, vocab_size: int = 1024):
    """A byte-level BPE fast tokenizer fitted on `texts`, with <s>, </s>, <pad>, <unk> and <image> as special
    tokens (one id each, also when they appear in text)."""
    require("transformers", "the vision-language stage")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [UNK, BOS, EOS, PAD, IMAGE]
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, additional_special_tokens=[IMAGE])


def llama_from_preset(name: str, tokenizer):
    """A randomly initialized LlamaForCausalLM of preset `name`, its vocabulary the tokenizer's (call under a fixed
    seed for reproducible weights)."""
    require("transformers", "the vision-language stage")
    from transformers import LlamaConfig, LlamaForCausalLM

    if name not in LM_PRESETS:
        raise ValueError(f"unknown language-model preset {name!r} (known: {', '.join(sorted(LM_PRESETS))})")
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, **LM_PRESETS[name])
    return LlamaForCausalLM(config)


def load_lm(path: str):
    """(causal LM in fp32, its fast tokenizer) from a local Hugging Face directory, without network. A tokenizer
    that does not know `<image>` learns it as a special token; the LM's vocabulary stays as it is (the model fills
    the image positions from the projector and never embeds or predicts that id)."""
    require("transformers", "the vision-language stage")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
    if not tokenizer.is_fast:
        raise ValueError(f"{path}: the tokenizer has no fast (Rust) version, which reports the character offsets "
                         "that place the labels; convert it with transformers' convert_slow_tokenizer")
    if IMAGE not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE]})
    lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return lm, tokenizer


def save_lm(lm, tokenizer, state: dict, path: str) -> None:
    """The LM (weights from `state`, the fp32 master copy, with the LM's own parameter names) and its tokenizer as
    a Hugging Face directory at `path`, written whole or not at all."""
    from fastenc.utils import atomic

    with atomic.atomic_dir(path) as tmp:
        lm.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def create_preset_lm(path: str, preset: str, texts, *, vocab_size: int, seed: int) -> None:
    """A random-init Llama of `preset` with a tokenizer fitted on `texts`, saved as a Hugging Face directory."""
    import torch

    tokenizer = train_chat_tokenizer(texts, vocab_size=vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = llama_from_preset(preset, tokenizer)
    save_lm(lm, tokenizer, lm.state_dict(), path)
