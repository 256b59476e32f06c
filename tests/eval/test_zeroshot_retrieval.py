"""Zero-shot classification (template-averaged class embeddings) and image-text retrieval recall@K, both on
precomputed embeddings."""

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

from fastenc.eval.retrieval import retrieval_recall
from fastenc.eval.zeroshot import DEFAULT_TEMPLATES, class_text_embeddings, fill_template, zero_shot_accuracy

CLASSES = ("circle", "square", "triangle", "star", "cross", "hexagon", "ring", "heart", "crescent", "arrow")


def fake_encode_text(texts, dim=64):
    """A bag of words: each word a fixed random vector (seeded by its hash), a text the sum of its words."""
    out = []
    for text in texts:
        vecs = []
        for word in text.strip(".").split():
            seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
            vecs.append(torch.randn(dim, generator=torch.Generator().manual_seed(seed)))
        out.append(torch.stack(vecs).sum(0))
    return torch.stack(out)


# --- zero-shot ---------------------------------------------------------------------------------------------------

def test_zero_shot_on_noisy_class_embeddings():
    class_emb = class_text_embeddings(CLASSES, DEFAULT_TEMPLATES, fake_encode_text)
    assert class_emb.shape == (10, 64)
    torch.testing.assert_close(class_emb.norm(dim=1), torch.ones(10))
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (1000,), generator=g)
    images = 3.0 * class_emb[labels] + 0.05 * torch.randn(1000, 64, generator=g)  # scale must not matter
    acc = zero_shot_accuracy(images, labels, class_emb)
    assert set(acc) == {"top1", "top5"} and acc["top1"] >= 0.99 and acc["top5"] == 1.0
    shuffled = zero_shot_accuracy(images, labels[torch.randperm(1000, generator=g)], class_emb, topk=(1, 5))
    assert abs(shuffled["top1"] - 0.1) < 0.05 and abs(shuffled["top5"] - 0.5) < 0.08
    # chunking over images changes nothing
    assert zero_shot_accuracy(images, labels, class_emb, chunk=7) == acc


def test_template_embeddings_are_normalized_then_averaged_then_renormalized():
    table = {"cat": torch.tensor([3.0, 0.0, 0.0]), "a cat": torch.tensor([0.0, 4.0, 0.0]),
             "dog": torch.tensor([0.0, 0.0, 2.0]), "a dog": torch.tensor([0.0, 0.0, 5.0])}
    calls = []
    def encode(texts):
        calls.append(texts)
        return torch.stack([table[t] for t in texts])
    emb = class_text_embeddings(["cat", "dog"], ["{}", "a {c}"], encode)
    assert calls == [["cat", "a cat"], ["dog", "a dog"]]
    s = 1 / math.sqrt(2)
    # mean of unit vectors (1,0,0) and (0,1,0), renormalized: not the direction of the raw mean (3,4,0)/2
    torch.testing.assert_close(emb, torch.tensor([[s, s, 0.0], [0.0, 0.0, 1.0]]))
    # and it matches the open_clip recipe on the fake encoder
    ref = torch.stack([F.normalize(F.normalize(fake_encode_text([t.format(c) for t in DEFAULT_TEMPLATES]), dim=-1)
                                   .mean(0), dim=0) for c in CLASSES[:3]])
    torch.testing.assert_close(class_text_embeddings(CLASSES[:3], DEFAULT_TEMPLATES, fake_encode_text), ref)
    assert fill_template("a photo of a {}.", "star") == fill_template("a photo of a {c}.", "star")
    assert fill_template("a photo of a {c}.", "star") == "a photo of a star."


def test_zero_shot_ties_count_against_the_image_and_topk_saturates():
    class_emb = torch.eye(3)
    labels = torch.tensor([0, 1, 2, 2])
    collapsed = torch.zeros(4, 3)  # every class scores 0: no image is top-1 correct, only top-3 (= all classes)
    assert zero_shot_accuracy(collapsed, labels, class_emb, topk=(1, 2, 3)) == {"top1": 0.0, "top2": 0.0, "top3": 1.0}
    assert zero_shot_accuracy(torch.eye(3)[labels], labels, class_emb, topk=(1, 5)) == {"top1": 1.0, "top5": 1.0}


def test_zero_shot_errors():
    class_emb = torch.eye(4)
    with pytest.raises(ValueError, match="class-count mismatch: labels go from 0 to 4 but class_emb has 4 classes"):
        zero_shot_accuracy(torch.randn(5, 4), torch.arange(5), class_emb)
    with pytest.raises(ValueError, match="embedding widths differ: image_emb has 3 dims, class_emb 4"):
        zero_shot_accuracy(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), class_emb)
    with pytest.raises(ValueError, match="labels must be"):
        zero_shot_accuracy(torch.randn(5, 4), torch.zeros(4, dtype=torch.long), class_emb)
    bad = torch.randn(5, 4)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        zero_shot_accuracy(bad, torch.zeros(5, dtype=torch.long), class_emb)
    with pytest.raises(ValueError, match="no templates"):
        class_text_embeddings(CLASSES, [], fake_encode_text)
    with pytest.raises(ValueError, match="no class-name placeholder"):
        class_text_embeddings(CLASSES, ["a photo"], fake_encode_text)
    with pytest.raises(ValueError, match="cannot be filled"):
        class_text_embeddings(CLASSES, ["a photo of a {name}"], fake_encode_text)
    with pytest.raises(ValueError, match="no class names"):
        class_text_embeddings([], DEFAULT_TEMPLATES, fake_encode_text)
    with pytest.raises(ValueError, match=r"\[T, E\] tensor for T=6"):
        class_text_embeddings(CLASSES, DEFAULT_TEMPLATES, lambda texts: torch.zeros(len(texts)))


# --- retrieval ---------------------------------------------------------------------------------------------------

def brute_force_recall(img, txt, ks, ids=None):
    """The definition, on the full N x M matrix: rank = non-matching candidates scoring >= the true match."""
    s = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    ids = torch.arange(len(img)) if ids is None else ids
    true = ids[None, :] == torch.arange(len(img))[:, None]  # [N, M]
    best_i = s.masked_fill(~true, -math.inf).max(dim=1).values
    rank_i = ((s >= best_i[:, None]) & ~true).sum(1)
    rank_t = ((s >= s[ids, torch.arange(len(txt))][None, :]) & ~true).sum(0)
    return {**{f"i2t_R@{k}": float((rank_i < k).double().mean()) for k in ks},
            **{f"t2i_R@{k}": float((rank_t < k).double().mean()) for k in ks}}


def test_matched_pairs_are_retrieved():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(300, 64, generator=g)
    r = retrieval_recall(img, img + 0.1 * torch.randn(300, 64, generator=g), chunk=128)
    assert list(r) == ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"]
    assert min(r.values()) >= 0.99


def test_random_pairing_gives_k_over_n():
    g = torch.Generator().manual_seed(0)
    n = 400
    img = torch.randn(n, 32, generator=g)
    r = retrieval_recall(img, img[torch.randperm(n, generator=g)], chunk=128)
    for k in (1, 5, 10):
        tol = 4 * math.sqrt(k / n * (1 - k / n) / n) + 0.005
        assert abs(r[f"i2t_R@{k}"] - k / n) <= tol and abs(r[f"t2i_R@{k}"] - k / n) <= tol


def test_matches_brute_force_and_ignores_chunk_size():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(60, 8, generator=g, dtype=torch.float64)
    txt = img + 0.8 * torch.randn(60, 8, generator=g, dtype=torch.float64)
    ks = (1, 2, 5, 10)
    ref = brute_force_recall(img, txt, ks)
    assert 0 < ref["i2t_R@1"] < 1 and 0 < ref["t2i_R@1"] < 1  # a non-trivial case
    for chunk in (1, 7, 60, 1024):
        assert retrieval_recall(img, txt, ks, chunk=chunk) == ref
    for ties in ("expected", "optimistic"):  # without ties every convention agrees
        assert retrieval_recall(img, txt, ks, chunk=7, ties=ties) == ref
    # several captions per image (image 29 has five, the others one to three)
    ids = torch.cat([torch.arange(30), torch.randint(0, 30, (40,), generator=g), torch.full((3,), 29)])
    img, txt = img[:30], torch.randn(len(ids), 8, generator=g, dtype=torch.float64) + 1.5 * img[ids]
    ref = brute_force_recall(img, txt, ks, ids)
    assert 0 < ref["i2t_R@1"] < 1 and 0 < ref["t2i_R@1"] < 1
    for chunk in (4, 13, 100):
        assert retrieval_recall(img, txt, ks, chunk=chunk, text_image_ids=ids) == ref
    # float32 inputs computed in float32 agree too
    assert retrieval_recall(img.float(), txt.float(), ks, chunk=13, text_image_ids=ids) == ref


def test_ties_count_against_the_query():
    img = torch.eye(4)
    txt = torch.eye(4)[[0, 0, 2, 3]]  # texts 0 and 1 identical; text 1's image (row 1) matches nothing
    r = retrieval_recall(img, txt, (1, 3, 4), chunk=3)
    # image 0: its text ties with text 1 (rank 1: miss at 1, hit at 3); image 1: all four texts tie at 0 (rank 3)
    assert (r["i2t_R@1"], r["i2t_R@3"], r["i2t_R@4"]) == (0.5, 0.75, 1.0)
    # text 1: image 0 beats its image, images 2 and 3 tie with it (rank 3)
    assert (r["t2i_R@1"], r["t2i_R@3"], r["t2i_R@4"]) == (0.75, 0.75, 1.0)
    # optimistic: only strictly better candidates count; expected: uniform random tie-breaking
    r = retrieval_recall(img, txt, (1, 3), chunk=3, ties="optimistic")
    assert r == {"i2t_R@1": 1.0, "i2t_R@3": 1.0, "t2i_R@1": 0.75, "t2i_R@3": 1.0}
    r = retrieval_recall(img, txt, (1, 3), chunk=3, ties="expected")
    # i2t: image 0 at rank 0 or 1, image 1 at rank 0..3; t2i: text 1 at rank 1..3 (image 0 beats it)
    assert r == pytest.approx({"i2t_R@1": (0.5 + 0.25 + 2) / 4, "i2t_R@3": (1 + 0.75 + 2) / 4,
                               "t2i_R@1": 3 / 4, "t2i_R@3": (3 + 2 / 3) / 4})
    assert retrieval_recall(torch.zeros(10, 4), torch.ones(10, 4), (1, 5), ties="expected") == pytest.approx(
        {"i2t_R@1": 0.1, "i2t_R@5": 0.5, "t2i_R@1": 0.1, "t2i_R@5": 0.5})  # all tie: chance
    # a duplicated caption ties whatever the rounding of the different products (fp32, wide embeddings)
    # (with tie_tol=0 this case gives i2t_R@1 = 1.0 at chunk 1 and 7: the true pair wins on rounding alone)
    g = torch.Generator().manual_seed(1)
    img = torch.randn(50, 768, generator=g)
    txt = img + 0.3 * torch.randn(50, 768, generator=g)
    img[1], txt[1] = img[0], txt[0]  # pairs 0 and 1 are the same pair twice
    for chunk in (1, 7, 50):
        r = retrieval_recall(img, txt, (1, 2), chunk=chunk)
        assert r == {"i2t_R@1": 48 / 50, "i2t_R@2": 1.0, "t2i_R@1": 48 / 50, "t2i_R@2": 1.0}  # 0 and 1 miss at 1


def test_retrieval_errors():
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="embedding widths differ: image_emb has 4 dims, text_emb 3"):
        retrieval_recall(x, torch.randn(5, 3))
    with pytest.raises(ValueError, match="5 images but 7 texts"):
        retrieval_recall(x, torch.randn(7, 4))
    with pytest.raises(ValueError, match="have no text"):
        retrieval_recall(x, torch.randn(4, 4), text_image_ids=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="go from 0 to 5 but there are 5 images"):
        retrieval_recall(x, torch.randn(6, 4), text_image_ids=torch.arange(6))
    with pytest.raises(ValueError, match="empty"):
        retrieval_recall(x[:0], x[:0])
    with pytest.raises(ValueError, match="ties must be"):
        retrieval_recall(x, x, ties="random")
    with pytest.raises(ValueError, match="ks must be"):
        retrieval_recall(x, x, ks=(0,))
