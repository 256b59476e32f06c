"""Weighted k-NN (DINO's eval_knn protocol) on frozen features, and `fastenc eval knn` on an exported encoder."""

import json

import pytest
import torch
import torch.nn.functional as F

from fastenc.eval.knn import extract_features, knn_accuracy, knn_classify


def test_knn_votes_are_similarity_weighted():
    train = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1])
    test = F.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=1)
    assert knn_classify(train, labels, test, k=2).tolist() == [0, 1]
    # k = 5: class 1 has 3 votes but far weaker ones; at T = 0.07 the two close class-0 neighbours win.
    assert knn_classify(train, labels, test[:1], k=5, temperature=0.07).tolist() == [0]
    # a huge temperature makes the vote a plain majority: 3 x class 1 beats 2 x class 0
    assert knn_classify(train, labels, test[:1], k=5, temperature=1e6).tolist() == [1]
    with pytest.raises(ValueError, match="feature widths differ"):
        knn_classify(train, labels, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="must be >= 0"):
        knn_classify(train, torch.tensor([0, 0, 1, -1, 1]), test)
    with pytest.raises(ValueError, match="at least one"):
        knn_classify(train[:0], labels[:0], test)


def test_knn_normalizes_its_inputs():
    """Cosine neighbours whatever the feature norms: raw features (norms up to 50) give the normalized answer; a
    plain dot product at T = 0.07 would overflow exp() and vote for class 0 everywhere."""
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(4, 8, generator=g)
    y = torch.arange(200) % 4
    x = (centers[y] + 0.05 * torch.randn(200, 8, generator=g)) * torch.empty(200, 1).uniform_(1, 50, generator=g)
    pred = knn_classify(x[:150], y[:150], x[150:])
    assert torch.equal(pred, knn_classify(F.normalize(x[:150], dim=1), y[:150], F.normalize(x[150:], dim=1)))
    assert float((pred == y[150:]).float().mean()) == 1.0


def test_knn_accuracy_on_separable_clusters():
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(5, 16, generator=g), dim=1)
    def draw(n):
        y = torch.randint(0, 5, (n,), generator=g)
        return F.normalize(centers[y] + 0.1 * torch.randn(n, 16, generator=g), dim=1), y
    (xtr, ytr), (xte, yte) = draw(200), draw(100)
    assert knn_accuracy(xtr, ytr, xte, yte) > 0.95
    assert knn_accuracy(xtr, ytr[torch.randperm(200, generator=g)], xte, yte) < 0.5  # shuffled labels: ~chance
    # the chunking of the test rows (automatic: bounded similarity block) does not change a prediction
    auto = knn_classify(xtr, ytr, xte)
    assert all(torch.equal(auto, knn_classify(xtr, ytr, xte, chunk=c)) for c in (1, 7, 100))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from fastenc.datatools.synth import write_synthetic_shards

    out = tmp_path_factory.mktemp("knn")
    write_synthetic_shards(str(out / "train"), 60, image_size=32, seed=0, samples_per_shard=30, progress=False)
    write_synthetic_shards(str(out / "val"), 20, image_size=32, seed=1, samples_per_shard=20, progress=False)
    return out


def test_features_and_cli_on_an_exported_encoder(shards, tmp_path, capsys):
    from fastenc.cli import main
    from fastenc.run.weights import save_safetensors
    from fastenc.models import create_vit

    torch.manual_seed(0)
    enc = create_vit("vit_test").eval()
    feats, labels = extract_features(enc, str(shards / "train"), "category_id")
    assert feats.shape == (60, 64) and labels.shape == (60,)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(60))
    both_f, both = extract_features(enc, str(shards / "train"), ["category_id", "color_id"], max_samples=50)
    assert both.shape == (50, 2) and torch.equal(both[:, 0], labels[:50]) and torch.allclose(both_f, feats[:50])
    meta = json.loads((shards / "train" / "manifest.json").read_text())
    assert meta["num_samples"] == 60
    path = tmp_path / "encoder.safetensors"
    save_safetensors(enc.state_dict(), str(path), {"model": "vit_test"})
    assert main(["eval", "knn", "--encoder", str(path), "--train-shards", str(shards / "train"),
                 "--val-shards", str(shards / "val"), "--label", "color_id"]) == 0
    out = capsys.readouterr().out
    assert "knn color_id: top-1" in out and "60 train / 20 val" in out
    # word_id is -1 for images without a word: those are left out, not voted for
    _, words = extract_features(enc, str(shards / "train"), "word_id")
    _, vwords = extract_features(enc, str(shards / "val"), "word_id")
    assert (words < 0).any()
    assert main(["eval", "knn", "--encoder", str(path), "--train-shards", str(shards / "train"),
                 "--val-shards", str(shards / "val"), "--label", "word_id"]) == 0
    assert f"{int((words >= 0).sum())} train / {int((vwords >= 0).sum())} val" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no exported encoder"):
        main(["eval", "knn", "--encoder", str(tmp_path), "--train-shards", "x", "--val-shards", "y"])
