"""Multiple-choice VQA (fastenc.eval.vqa, `fastenc eval vqa`, the suite's `vqa` protocol) on a tiny vision-language
run dir built in seconds (no training): a `vit_test` encoder, a 1-layer Llama of width 32 with a BPE tokenizer
fitted on the prompt's words, and a fresh projector, exported by the llava objective itself."""

import base64
import io
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import yaml

pytest.importorskip("transformers", reason="the vision-language stage needs transformers (make setup)")

from fastenc.cli import main  # noqa: E402
from fastenc.data.conversation import IGNORE  # noqa: E402
from fastenc.eval.features import EvalDataError  # noqa: E402
from fastenc.eval.vqa import (VQAFormatError, VQAItem, evaluate_vqa, group_of, load_benchmark,  # noqa: E402
                              option_logliks, parse_letter, prompt_text, render_tables, sequence_logliks, summarize)
from tests.engine.conftest import ROOT  # noqa: E402

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}


# ---------------------------------------------------------------------------------------------------------------
# The tiny run dir and benchmark files


@pytest.fixture(scope="module")
def vlm_run(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastenc.config import load_config
    from fastenc.data.conversation import VICUNA_V1
    from fastenc.models import create_vit
    from fastenc.models.language import save_lm, train_chat_tokenizer
    from fastenc.objectives import build_objective
    from fastenc.run.configs import write_config
    from fastenc.run.layout import RunDir

    root = tmp_path_factory.mktemp("vqa_run")
    texts = [VICUNA_V1.system, "USER: ASSISTANT: Question: Options:", "What color is the shape? Which shape is it?",
             "Answer with the option's letter from the given choices directly.", " ".join(COLORS),
             "circle square triangle", "A. B. C. D.", " A", " B", " C", " D"] * 5
    tokenizer = train_chat_tokenizer(texts, vocab_size=400)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = create_vit("vit_test")
        lm = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    vision = str(root / "vit.safetensors")
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, vision,
              metadata={"format": "pt", "model": "vit_test"})
    save_lm(lm, tokenizer, lm.state_dict(), str(root / "lm"))
    cfg = load_config(os.path.join(ROOT, "configs/cpu/llava_tiny_stage1.yaml"), [
        "model.name=vit_test", f"objective.vision.source={vision}", f"objective.lm.path={root / 'lm'}",
        f"run.output_dir={root}", "run.name=vlm_tiny", "objective.max_length=256"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        objective = build_objective(cfg)
    run_dir = RunDir.of(cfg)
    os.makedirs(run_dir.root)
    write_config(run_dir, cfg)
    objective.export_files(objective.state_dict(), run_dir)
    return SimpleNamespace(root=root, run_dir=run_dir.root, vision=vision)


@pytest.fixture(scope="module")
def vlm(vlm_run):
    from fastenc.run.weights import load_vlm

    return load_vlm(vlm_run.run_dir)


def _image_bytes(color, fmt="PNG", size=(40, 30)):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, COLORS[color]).save(buf, fmt)
    return buf.getvalue()


def _rows():
    """Six items as VMCBench has them (D empty in one: three options), with an extra "type" column."""
    rows = []
    for i, (color, category) in enumerate([("red", "VQAv2"), ("blue", "MathVista"), ("green", "TextVQA"),
                                           ("yellow", "ChartQA"), ("red", "A-OKVQA"), ("blue", "mystery")]):
        options = list(COLORS)
        rows.append({"index": 100 + i, "question": "What color is the shape?", "A": options[0], "B": options[1],
                     "C": options[2], "D": options[3] if i != 3 else None, "answer": "ABCD"[options.index(color)],
                     "category": category, "type": "color" if i % 2 == 0 else "shape",
                     "image": _image_bytes(color, "JPEG" if i % 2 else "PNG")})
    rows[3]["answer"] = "C"  # its D is empty
    return rows


def _write_parquet(path, rows, rename=None):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the HF Image feature
    columns = {
        "index": pa.array([r["index"] for r in rows], pa.int64()),
        **{c: pa.array([r[c] for r in rows], pa.string())
           for c in ("question", "A", "B", "C", "D", "answer", "category", "type")},
        "image": pa.array([{"bytes": r["image"], "path": f"{r['index']}.png"} for r in rows], image_type),
    }
    if rename:
        columns = {rename.get(k, k): v for k, v in columns.items()}
    pq.write_table(pa.table(columns), path)
    return str(path)


def _write_tsv(path, rows):
    """VLMEvalKit's layout: pandas' to_csv(sep="\\t"), images in base64; a repeated image refers to its first row by
    index."""
    import csv

    first = {}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["index", "question", "A", "B", "C", "D", "answer", "category", "type", "image"])
        for r in rows:
            image = base64.b64encode(r["image"]).decode()
            image = str(first.setdefault(image, r["index"])) if image in first else first.setdefault(image, image)
            writer.writerow([r["index"], r["question"], r["A"], r["B"], r["C"], r["D"] or "", r["answer"],
                             r["category"], r["type"], image])
    return str(path)


def _write_jsonl(folder, rows, name="bench.jsonl"):
    os.makedirs(folder / "images", exist_ok=True)
    with open(folder / name, "w") as f:
        for r in rows:
            image = f"images/{r['index']}.png"
            (folder / image).write_bytes(r["image"])
            f.write(json.dumps({**{k: v for k, v in r.items() if k != "image"}, "image": image}) + "\n")
    return str(folder / name)


# ---------------------------------------------------------------------------------------------------------------
# Prompt, letter parsing, groups, summary


def test_prompt_is_the_papers_with_empty_options_left_out():
    item = VQAItem(0, "What is it?", {"A": "cat", "B": "dog", "C": "sun", "D": "moon"}, "B", "MMStar")
    assert prompt_text(item) == ("Question: What is it?\nOptions:\nA. cat\nB. dog\nC. sun\nD. moon\n"
                                 "Answer with the option's letter from the given choices directly.")
    item.options = {"A": "cat", "B": "dog", "C": "sun"}
    assert prompt_text(item).endswith("C. sun\nAnswer with the option's letter from the given choices directly.")


def test_parse_letter():
    options = {"A": "red", "B": "blue", "C": "A cat", "D": "green"}
    for text, want in [("B", "B"), ("b", "B"), (" B. ", "B"), ("(B)", "B"), ("B)", "B"), ("Answer: B", "B"),
                       ("answer: (d)", "D"), ("The answer is B.", "B"), ("B. blue", "B"), ("(C) A cat", "C"),
                       ("Blue", "B"), ("blue.", "B"), ("a cat", "C"), ("A cat", "C"), ("A", "A"),
                       ("E", None), ("purple", None), ("", None), ("I think it is blue or red", None),
                       ("Bluebird", None)]:
        assert parse_letter(text, options) == want, text
    assert parse_letter("D", {"A": "x", "B": "y", "C": "z"}) is None  # not one of this item's options


def test_group_mapping():
    for category, group in [("SEEDBench", "general"), ("seed_bench", "general"), ("A-OKVQA", "general"),
                            ("a_okvqa", "general"), ("VQAv2", "general"), ("MathVision", "reason"),
                            ("Math-Vista", "reason"), ("realworldqa", "reason"), ("OCRVQA", "ocr"),
                            ("TextVQA", "ocr"), ("Table_VQA_Bench", "doc"), ("AI2D", "doc"), ("InfoVQA", "doc"),
                            ("doc", "doc"), ("General", "general"), ("OCR", "ocr"), ("mystery", "other"),
                            ("", "other")]:
        assert group_of(category) == group, category


def _preds():
    """10 hand-made predictions: (category, type, correct, number of options)."""
    rows = [("VQAv2", "color", True, 4), ("VQAv2", "shape", False, 4), ("MMStar", "color", True, 4),
            ("MathVista", "color", True, 4), ("MathVista", "shape", True, 3), ("GQA", "shape", False, 2),
            ("TextVQA", "color", False, 4), ("ChartQA", "shape", True, 4), ("doc", "color", False, 4),
            ("mystery", "color", True, 4)]
    return [{"category": c, "type": t, "correct": ok, "num_options": k} for c, t, ok, k in rows]


def _cells(table):
    return {k: (v["n"], v["correct"], v["accuracy"], v["chance"], v["ci"]) for k, v in table.items()}


def test_summary_exact_numbers():
    s = summarize(_preds(), by=["type"], bootstrap=0)
    assert s["overall"] == {"n": 10, "correct": 6, "accuracy": 0.6, "ci": None,
                            "chance": pytest.approx((8 / 4 + 1 / 3 + 1 / 2) / 10)}
    assert _cells(s["group"]) == {"general": (3, 2, 2 / 3, 0.25, None),
                                  "reason": (3, 2, 2 / 3, pytest.approx((1 / 4 + 1 / 3 + 1 / 2) / 3), None),
                                  "ocr": (1, 0, 0.0, 0.25, None), "doc": (2, 1, 0.5, 0.25, None),
                                  "other": (1, 1, 1.0, 0.25, None)}
    assert list(s["group"]) == ["general", "reason", "ocr", "doc", "other"]
    assert _cells(s["category"]) == {
        "MMStar": (1, 1, 1.0, 0.25, None), "VQAv2": (2, 1, 0.5, 0.25, None), "GQA": (1, 0, 0.0, 0.5, None),
        "MathVista": (2, 2, 1.0, pytest.approx(7 / 24), None), "TextVQA": (1, 0, 0.0, 0.25, None),
        "ChartQA": (1, 1, 1.0, 0.25, None), "doc": (1, 0, 0.0, 0.25, None), "mystery": (1, 1, 1.0, 0.25, None)}
    assert list(s["category"])[:2] == ["MMStar", "VQAv2"]  # by group, then by name
    assert _cells(s["by"]["type"]) == {"color": (6, 4, 4 / 6, 0.25, None),
                                       "shape": (4, 2, 0.5, pytest.approx((1 / 4 + 1 / 3 + 1 / 2 + 1 / 4) / 4), None)}
    assert (s["errors"], s["unparsed"]) == (0, 0)


def test_bootstrap_interval_is_deterministic_contains_the_estimate_and_matches_item_resampling():
    import numpy as np

    a = summarize(_preds(), by=["type"], bootstrap=1000, seed=0)
    assert a == summarize(_preds(), by=["type"], bootstrap=1000, seed=0)
    assert summarize(_preds() * 10, seed=1)["overall"]["ci"] != summarize(_preds() * 10, seed=0)["overall"]["ci"]
    for cell in [a["overall"], *a["group"].values(), *a["category"].values(), *a["by"]["type"].values()]:
        low, high = cell["ci"]
        assert 0 <= low <= cell["accuracy"] <= high <= 1
    assert a["category"]["MMStar"]["ci"] == [1.0, 1.0]
    # the direct binomial draw is item resampling: the percentile interval of 20000 explicit resamples agrees
    correct = np.array([p["correct"] for p in _preds()] * 4, dtype=float)  # 40 items, 60% correct
    rng = np.random.default_rng(0)
    explicit = np.percentile(correct[rng.integers(0, len(correct), (20000, len(correct)))].mean(1), [2.5, 97.5])
    ours = summarize(_preds() * 4, bootstrap=20000)["overall"]["ci"]
    assert np.allclose(ours, explicit, atol=0.026)  # one item is 0.025


# ---------------------------------------------------------------------------------------------------------------
# Likelihood scoring


def _direct_loglik(vlm, item, letter):
    """The answer's log-likelihood computed alone: the training rendering, one unpadded sequence, full log_softmax."""
    from fastenc.eval.chat import image_pixels

    record = {"conversations": [{"from": "human", "value": prompt_text(item)}, {"from": "gpt", "value": letter}]}
    ids, labels = vlm.conversations(record, has_image=True)
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = vlm.model.lm(inputs_embeds=vlm.model.embed(x, image_pixels(vlm, item.image))).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if labels[t] != IGNORE)


def test_likelihood_picks_the_letter_the_lm_prefers_and_equals_a_direct_computation(vlm_run):
    from fastenc.run.weights import load_vlm

    vlm = load_vlm(vlm_run.run_dir)  # its own copy: a hook goes on its LM head
    item = VQAItem(7, "What color is the shape?", dict(zip("ABCD", COLORS)), "B", "VQAv2", _image_bytes("blue"))
    answer_tokens = {}
    for letter in "ABCD":
        record = {"conversations": [{"from": "human", "value": prompt_text(item)}, {"from": "gpt", "value": letter}]}
        ids, labels = vlm.conversations(record, has_image=True)
        answer_tokens[letter] = {i for i, lab in zip(ids, labels) if lab != IGNORE}
    only_b = answer_tokens["B"] - answer_tokens["A"] - answer_tokens["C"] - answer_tokens["D"]
    assert only_b and answer_tokens["B"] & answer_tokens["A"]  # the letter's token; the end-of-turn one is shared
    bias = torch.zeros(len(vlm.tokenizer))
    bias[list(only_b)] = 20.0
    handle = vlm.model.lm.lm_head.register_forward_hook(lambda module, inputs, out: out + bias)
    try:
        ll = option_logliks(vlm, item)
        assert max(ll, key=ll.get) == "B"
        for letter in "ABCD":
            assert ll[letter] == pytest.approx(_direct_loglik(vlm, item, letter), abs=1e-4)
        result = evaluate_vqa(vlm, [item], "likelihood", progress=False)
        assert result["predictions"][0]["prediction"] == "B" and result["predictions"][0]["correct"]
        assert result["predictions"][0]["loglik"] == pytest.approx(ll)
    finally:
        handle.remove()
    ll = option_logliks(vlm, item)  # the plain random LM: still the direct computation
    for letter in "ABCD":
        assert ll[letter] == pytest.approx(_direct_loglik(vlm, item, letter), abs=1e-4)
    vlm.conversations.max_length = 40  # a run trained on shorter sequences: scored uncut, and counted
    result = evaluate_vqa(vlm, [item], "likelihood", progress=False)
    assert result["predictions"][0]["loglik"] == pytest.approx(ll) and result["summary"]["over_max_length"] == 1


def test_cloze_scores_the_option_texts_after_the_bare_question_per_character(vlm_run):
    """cloze: each option's text as the answer to the question alone (no option list, no letters), its
    log-likelihood over its length in characters; the LM made to prefer one text's tokens picks its letter."""
    from fastenc.eval.chat import image_pixels
    from fastenc.eval.vqa import modes_of
    from fastenc.run.weights import load_vlm

    vlm = load_vlm(vlm_run.run_dir)  # its own copy: a hook goes on its LM head
    item = VQAItem(3, "What color is the shape?", dict(zip("ABCD", COLORS)), "C", "VQAv2", _image_bytes("green"))
    pixels = image_pixels(vlm, item.image)

    def direct(text):
        record = {"conversations": [{"from": "human", "value": item.question}, {"from": "gpt", "value": text}]}
        ids, labels = vlm.conversations(record, has_image=True)
        assert "Options" not in vlm.tokenizer.decode(ids)  # the bare question
        return sequence_logliks(vlm.model, [(ids, labels)], pixels)[0] / len(text)

    plain = evaluate_vqa(vlm, [item], "cloze", progress=False)["predictions"][0]
    assert plain["loglik"] == pytest.approx({k: direct(v) for k, v in item.options.items()}, abs=1e-4)
    target = {i for i in vlm.tokenizer(item.options["C"], add_special_tokens=False)["input_ids"]}
    for other in "ABD":
        target -= set(vlm.tokenizer(item.options[other], add_special_tokens=False)["input_ids"])
    assert target
    bias = torch.zeros(len(vlm.tokenizer))
    bias[list(target)] = 20.0
    handle = vlm.model.lm.lm_head.register_forward_hook(lambda module, inputs, out: out + bias)
    try:
        pred = evaluate_vqa(vlm, [item], "cloze", progress=False)["predictions"][0]
        assert pred["prediction"] == "C" and pred["correct"]
    finally:
        handle.remove()
    assert modes_of("cloze,likelihood") == ("likelihood", "cloze") and modes_of("both") == ("likelihood", "generate")
    assert modes_of("all") == ("likelihood", "cloze", "generate")
    with pytest.raises(EvalDataError, match="unknown vqa mode"):
        modes_of("likelihood,guess")


def test_padded_rows_score_as_they_do_alone(vlm):
    from fastenc.eval.chat import image_pixels

    pixels = image_pixels(vlm, _image_bytes("red"))
    rows = [vlm.conversations({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
                              has_image=True)
            for q, a in [("What color is the shape?", "red"), ("Which shape is it? circle square triangle", "B"),
                         ("What?", "a red circle square")]]
    assert len({len(ids) for ids, _ in rows}) == 3
    together = sequence_logliks(vlm.model, rows, pixels)
    alone = [sequence_logliks(vlm.model, [row], pixels)[0] for row in rows]
    assert together == pytest.approx(alone, abs=1e-4)


def test_generate_mode_parses_the_answer(vlm, monkeypatch):
    import fastenc.eval.chat as chat

    items = [VQAItem(i, "What color is the shape?", dict(zip("ABCD", COLORS)), "ABCD"[i], "TextVQA",
                     _image_bytes("red")) for i in range(4)]
    answers = iter(["A", "(b)", "green", "I do not know"])
    monkeypatch.setattr(chat, "answer", lambda vlm, image, question, max_new_tokens: next(answers))
    res = evaluate_vqa(vlm, items, "generate", progress=False, bootstrap=0)
    assert [p["prediction"] for p in res["predictions"]] == ["A", "B", "C", None]
    assert [p["text"] for p in res["predictions"]] == ["A", "(b)", "green", "I do not know"]
    assert res["summary"]["unparsed"] == 1 and res["summary"]["overall"]["correct"] == 3


def test_an_image_that_does_not_decode_is_counted_not_fatal(vlm):
    items = [VQAItem(0, "What color?", dict(zip("ABCD", COLORS)), "A", "VQAv2", b"not an image"),
             VQAItem(1, "What color?", dict(zip("ABCD", COLORS)), "A", "VQAv2", _image_bytes("red"))]
    res = evaluate_vqa(vlm, items, "likelihood", progress=False, bootstrap=0)
    assert "error" in res["predictions"][0] and res["predictions"][0]["prediction"] is None
    assert "error" not in res["predictions"][1]
    assert res["summary"]["errors"] == 1 and res["summary"]["overall"]["n"] == 2


# ---------------------------------------------------------------------------------------------------------------
# Files in the released layouts, end to end through the CLI


def test_parquet_and_tsv_in_vmcbenchs_layout_end_to_end(vlm_run, tmp_path, capsys):
    rows = _rows()
    parquet = _write_parquet(tmp_path / "test-00000-of-00001.parquet", rows)
    tsv = _write_tsv(tmp_path / "VMCBench.tsv", rows)
    items = {p: load_benchmark(p) for p in (parquet, tsv)}
    for got in items.values():
        assert [it.index for it in got] == [100, 101, 102, 103, 104, 105]
        assert [it.answer for it in got] == [r["answer"] for r in rows]
        assert list(got[3].options) == ["A", "B", "C"] and got[0].extra == {"type": "color"}
        assert [it.group for it in got] == ["general", "reason", "ocr", "doc", "general", "other"]
    assert [it.image for it in items[parquet]] == [r["image"] for r in rows]  # kept encoded
    assert [it.image for it in items[tsv]] == [r["image"] for r in rows]  # repeated images resolved by index

    out_p, out_t = tmp_path / "out_parquet", tmp_path / "out_tsv"
    assert main(["eval", "vqa", f"tiny={vlm_run.run_dir}", "--benchmark", parquet, "--out", str(out_p),
                 "--by", "type", "--bootstrap", "200"]) == 0
    assert "tiny (likelihood): " in capsys.readouterr().out
    assert main(["eval", "vqa", f"tiny={vlm_run.run_dir}", "--benchmark", tsv, "--out", str(out_t), "--by", "type",
                 "--bootstrap", "200", "--mode", "both", "--max-new-tokens", "3", "--limit", "4"]) == 0
    res_p, res_t = (json.load(open(o / "results.json")) for o in (out_p, out_t))
    s = res_p["results"]["tiny"]["likelihood"]
    assert s["overall"]["n"] == 6 and s["overall"]["chance"] == pytest.approx((5 / 4 + 1 / 3) / 6)
    assert set(s["group"]) == {"general", "reason", "ocr", "doc", "other"} and set(s["by"]["type"]) == {"color",
                                                                                                       "shape"}
    assert res_p["made_by"]["command"].startswith("fastenc eval vqa ")
    preds_p = [json.loads(line) for line in open(out_p / "predictions-tiny.jsonl")]
    assert len(preds_p) == 6 and set(preds_p[0]["loglik"]) == {"A", "B", "C", "D"}
    assert set(preds_p[3]["loglik"]) == {"A", "B", "C"}
    assert all(math.isfinite(v) for p in preds_p for v in p["loglik"].values())
    # both modes on the TSV: the same items, the same likelihoods as from the parquet
    assert set(res_t["results"]["tiny"]) == {"likelihood", "generate"} and res_t["num_items"] == 4
    preds_t = [json.loads(line) for line in open(out_t / "predictions-tiny.jsonl")]
    assert [p["mode"] for p in preds_t] == ["likelihood"] * 4 + ["generate"] * 4
    for a, b in zip(preds_p[:4], preds_t[:4]):
        assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-5) and a["prediction"] == b["prediction"]
    assert all("text" in p and "parsed" in p for p in preds_t[4:])
    report = open(out_t / "report.md").read()
    for want in ("**by VMCBench group**", "**by category**", "**by type**", "| tiny (likelihood) |",
                 "| tiny (generate) |", "| *chance* |", "overall (n=4)", "general (n=1)"):
        assert want in report, want
    assert "| *chance* | 25.0 | 25.0 | 25.0 | 33.3 | 27.1 |" in report  # groups general reason ocr doc + overall


def test_jsonl_and_json_with_image_paths(vlm_run, tmp_path):
    rows = _rows()[:3]
    jsonl = _write_jsonl(tmp_path, rows)
    items = load_benchmark(jsonl)
    assert items[0].image == str(tmp_path / "images" / "100.png") and items[0].extra == {"type": "color"}
    records = [json.loads(line) for line in open(jsonl)]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bench.json").write_text(json.dumps(records))
    with pytest.raises(VQAFormatError, match=r"row 0 \(index 100\): image 'images/100.png' not found"):
        load_benchmark(str(tmp_path / "sub" / "bench.json"))
    items = load_benchmark(str(tmp_path / "sub" / "bench.json"), image_root=str(tmp_path), limit=2)
    assert len(items) == 2 and os.path.isfile(items[1].image)
    del records[1]["D"]  # a record without a key: that option is empty
    (tmp_path / "sub" / "three.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    items = load_benchmark(str(tmp_path / "sub" / "three.jsonl"), image_root=str(tmp_path))
    assert [list(it.options) for it in items] == [list("ABCD"), list("ABC"), list("ABCD")]
    with pytest.raises(VQAFormatError, match="unknown benchmark format"):
        load_benchmark(str(tmp_path / "sub" / "bench.json").replace("bench.json", "") + "../images/100.png")
    out = tmp_path / "out"
    assert main(["eval", "vqa", vlm_run.run_dir, "--benchmark", jsonl, "--out", str(out), "--bootstrap", "0"]) == 0
    res = json.load(open(out / "results.json"))
    assert list(res["results"]) == ["vlm_tiny"] and res["results"]["vlm_tiny"]["likelihood"]["overall"]["ci"] is None
    assert os.path.isfile(out / "predictions-vlm_tiny.jsonl")


def test_wrong_formats_give_clear_errors(vlm_run, tmp_path, capsys, monkeypatch):
    rows = _rows()
    renamed = _write_parquet(tmp_path / "renamed.parquet", rows, rename={"answer": "label"})
    with pytest.raises(VQAFormatError, match=r"renamed.parquet: missing column 'answer' .*found: .*'label'"):
        load_benchmark(renamed)
    assert isinstance(VQAFormatError("x"), EvalDataError)
    assert main(["eval", "vqa", vlm_run.run_dir, "--benchmark", renamed, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing column 'answer'" in err and len(err.strip().splitlines()) == 1

    bad = [dict(r) for r in rows[:3]]
    bad[2]["answer"] = "E"
    with pytest.raises(VQAFormatError, match=r"row 2 \(index 102\): answer 'E' is not the letter"):
        load_benchmark(_write_jsonl(tmp_path, bad, "bad_letter.jsonl"))
    bad[2]["answer"], bad[2]["D"] = "D", ""
    with pytest.raises(VQAFormatError, match=r"row 2 \(index 102\): answer 'D' .*\(A, B, C\)"):
        load_benchmark(_write_jsonl(tmp_path, bad, "empty_option.jsonl"))
    with pytest.raises(VQAFormatError, match="by column.*'kind' not in the benchmark.*type"):
        from fastenc.eval.vqa import run_vqa

        run_vqa([vlm_run.run_dir], _write_jsonl(tmp_path, rows[:2], "ok.jsonl"), str(tmp_path / "o2"), by=["kind"])
    assert main(["eval", "vqa", vlm_run.vision, "--benchmark", str(tmp_path / "ok.jsonl"),
                 "--out", str(tmp_path / "o3")]) == 2
    assert "not a vision-language run dir" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)  # pyarrow not installed
    with pytest.raises(VQAFormatError, match="pip install pyarrow"):
        load_benchmark(renamed)


# ---------------------------------------------------------------------------------------------------------------
# The suite protocol


def test_suite_vqa_protocol_scores_vlm_runs_and_skips_the_others(vlm_run, tmp_path):
    from fastenc.eval.suite import load_suite, run_suite

    bench = _write_jsonl(tmp_path, _rows()[:3])
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "vqa", "protocols": {
        "vqa": {"benchmark": bench, "by": ["type"], "bootstrap": 100},
        "vqa.gen": {"benchmark": bench, "mode": "generate", "max_new_tokens": 2, "limit": 1}}}))
    out = tmp_path / "out"
    res = run_suite([f"enc={vlm_run.vision}", f"vlm={vlm_run.run_dir}"], str(suite), str(out))
    p = res["protocols"]
    assert p["vqa"]["results"]["enc"] == {"skipped": "not a vision-language run"}
    assert p["vqa"]["results"]["vlm"]["likelihood"]["overall"]["n"] == 3
    assert set(p["vqa"]["results"]["vlm"]["likelihood"]["by"]["type"]) == {"color", "shape"}
    assert p["vqa.gen"]["results"]["vlm"]["generate"]["overall"]["n"] == 1
    assert len(open(out / "vqa" / "predictions-vlm.jsonl").readlines()) == 3
    assert json.load(open(out / "results.json"))["protocols"]["vqa"]["results"]["enc"]["skipped"]
    report = open(out / "report.md").read()
    assert "## vqa" in report and "| vlm |" in report and "enc: skipped (not a vision-language run)" in report
    # checked before anything runs
    suite.write_text(yaml.safe_dump({"protocols": {"vqa": {"benchmark": str(tmp_path / "nope.jsonl")}}}))
    with pytest.raises(EvalDataError, match="benchmark file .*nope.jsonl.* not found"):
        run_suite([vlm_run.run_dir], str(suite), str(tmp_path / "out2"))
    suite.write_text(yaml.safe_dump({"protocols": {"vqa": {"benchmark": bench, "choices": 4}}}))
    with pytest.raises(EvalDataError, match="unknown arguments"):
        load_suite(str(suite))


def test_a_grouping_equal_to_one_above_is_named_not_repeated():
    def cell(n, correct):
        return {"n": n, "correct": correct, "accuracy": correct / n, "chance": 0.25, "ci": [0.0, 1.0]}

    groups = {"general": cell(4, 1), "ocr": cell(2, 2)}
    summary = {"overall": cell(6, 3), "group": groups, "category": dict(groups),
               "by": {"type": {"color": cell(4, 1), "word": cell(2, 2)}}}
    text = "\n".join(render_tables({"clip": {"likelihood": summary}}))
    assert text.count("| clip |") == 2 and "**by VMCBench group**" in text and "**by type**" in text
    assert "**by category**: the same cells as by VMCBench group" in text
    summary["category"] = {"chart": cell(4, 1), "ocr": cell(2, 2)}  # VMCBench's own finer categories: drawn
    text = "\n".join(render_tables({"clip": {"likelihood": summary}}))
    assert text.count("| clip |") == 3 and "chart (n=4)" in text
