"""The text tower: open_clip parity, EOS pooling that ignores padding, causality, input errors."""

import pytest
import torch

import fastenc.models.layers.block as block_module
from fastenc.models import create_text_tower
from fastenc.models.text import convert_open_clip_text_state_dict

VOCAB, EOS, PAD = 100, 99, 0  # EOS is the largest id, as in CLIP's tokenizer (open_clip pools at the argmax)


def _tower(**overrides):
    return create_text_tower("text_test", vocab_size=VOCAB, output_dim=32, **overrides).eval()


def _captions(*lengths, seq_len=16):
    """Right-padded rows of random ids in [1, EOS) with EOS last: [len(lengths), seq_len]."""
    tokens = torch.full((len(lengths), seq_len), PAD)
    for row, n in enumerate(lengths):
        tokens[row, : n - 1] = torch.randint(1, EOS, (n - 1,))
        tokens[row, n - 1] = EOS
    return tokens


def test_output_shape_and_eos_pooling():
    tower = _tower()
    tokens = _captions(5, 16, 1)
    with torch.no_grad():
        out = tower(tokens)
        hidden = tower.forward_features(tokens)
    assert out.shape == (3, 32) and hidden.shape == (3, 16, 64)
    assert tower.eos_index(tokens).tolist() == [4, 15, 0]
    torch.testing.assert_close(out, tower.text_projection(hidden[[0, 1, 2], [4, 15, 0]]), atol=0, rtol=0)
    torch.testing.assert_close(tower.encode(tokens), out, atol=0, rtol=0)


@pytest.mark.parametrize("attn_impl", ["math", "sdpa"])
def test_padding_does_not_change_the_embedding(attn_impl):
    tower = _tower(attn_impl=attn_impl)
    short = _captions(6, 3, seq_len=6)
    longer = torch.cat([short, torch.full((2, 10), PAD)], dim=1)  # same captions, 10 more pad tokens
    with torch.no_grad():
        # fp32; the causal mask keeps padding out of every real position, so only the matmul shapes differ.
        torch.testing.assert_close(tower(longer), tower(short), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(tower(longer[1:]), tower(short)[1:], atol=1e-6, rtol=1e-5)  # batch-independent


def test_padding_does_not_change_the_gradients():
    """Batches are padded to their longest caption (text_padding="longest"): training must not see a difference."""
    tower = _tower(attn_impl="sdpa")
    short = _captions(6, 3, 8, seq_len=8)
    longer = torch.cat([short, torch.full((3, 8), PAD)], dim=1)
    weights = torch.randn(3, 32)
    grads = []
    for tokens in (short, longer):
        tower.zero_grad()
        (tower(tokens) * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in tower.named_parameters()})
    for name, ref in grads[0].items():  # fp32 sums over different matmul shapes: tolerance relative to the scale
        torch.testing.assert_close(grads[1][name], ref, atol=2e-6 * float(ref.abs().max()), rtol=1e-4, msg=name)
    assert (grads[1]["positional_embedding"][8:] == 0).all()  # positions after every EOS get no gradient


def test_hidden_states_are_causal():
    tower = _tower()
    tokens = _captions(12)
    changed = tokens.clone()
    changed[0, 7] = (changed[0, 7] % (EOS - 1)) + 1  # a different non-pad, non-EOS id
    with torch.no_grad():
        a, b = tower.forward_features(tokens), tower.forward_features(changed)
    torch.testing.assert_close(b[:, :7], a[:, :7], atol=0, rtol=0)
    assert not torch.allclose(b[:, 7:], a[:, 7:])


def test_open_clip_weights_give_the_same_embedding():
    open_clip_transformer = pytest.importorskip("open_clip.transformer")
    theirs = open_clip_transformer.TextTransformer(context_length=16, vocab_size=VOCAB, width=64, heads=4, layers=2,
                                                   output_dim=32).eval()
    ours = _tower()
    ours.load_state_dict(convert_open_clip_text_state_dict(theirs.state_dict()), strict=True)
    tokens = _captions(5, 16, 9)
    with torch.no_grad():
        expected = theirs(tokens)
        # fp32, 2 layers of width 64; nn.MultiheadAttention and our SDPA path differ only in accumulation order.
        torch.testing.assert_close(ours(tokens), expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


def test_grad_checkpointing_same_grads(monkeypatch):
    calls = []

    def spy(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(block_module, "checkpoint", spy)
    tower = _tower().train()
    tokens = _captions(7, 16)
    weight = torch.randn(2, 32)

    def grads():
        tower.zero_grad()
        (tower(tokens) * weight).sum().backward()
        return {n: p.grad.clone() for n, p in tower.named_parameters()}

    off = grads()
    tower.set_grad_checkpointing(True)
    on = grads()
    assert calls == [False, False]
    for name in off:  # same fp32 ops recomputed: equal to rounding
        torch.testing.assert_close(on[name], off[name], atol=1e-6 * off[name].abs().max().item(), rtol=0)


def test_bad_inputs_are_explained():
    tower = _tower()
    with pytest.raises(ValueError, match="Sequence length 17 exceeds context_length=16"):
        tower(torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids.*torch.float32"):
        tower(torch.ones(1, 8))
    with pytest.raises(ValueError, match=r"token ids \[B, L\], got shape \(8,\)"):
        tower(torch.ones(8, dtype=torch.long))


def test_no_weight_decay_names_exist():
    tower = _tower()
    assert tower.no_weight_decay() == {"positional_embedding", "token_embedding.weight"}
    assert tower.no_weight_decay() <= dict(tower.named_parameters()).keys()
