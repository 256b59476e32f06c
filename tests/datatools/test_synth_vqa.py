"""fastenc.datatools.synth_vqa: the synthetic VLM data and its multiple-choice benchmark say what the images show."""

import json
import re

import numpy as np
import pytest

from fastenc.datatools.synth import render_sample
from fastenc.datatools.synth_vqa import LETTERS, QUESTION_TYPES, answer_of, multiple_choice, write_synthetic_vqa
from fastenc.eval.vqa import load_benchmark, prompt_text


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_vqa")
    return out, write_synthetic_vqa(str(out), 60, num_heldout=40, image_size=32, seed=3)


def _index(image: str) -> int:
    return int(re.search(r"(\d+)\.jpg$", image).group(1))


def test_benchmark_answers_match_the_rendered_attributes(written):
    out, paths = written
    rows = [json.loads(line) for line in open(paths["benchmark"])]
    assert {r["type"] for r in rows} == set(QUESTION_TYPES)
    for r in rows:
        i = _index(r["image"])
        assert 60 <= i < 100  # held-out images only
        _, attrs = render_sample(i, image_size=32, seed=3)
        options = [r[k] for k in LETTERS]
        assert len(set(options)) == 4 and set(options) <= set(QUESTION_TYPES[r["type"]][3])
        assert r[r["answer"]] == answer_of(r["type"], attrs)
        assert r["category"] == QUESTION_TYPES[r["type"]][0]
    # every held-out image gets each question it answers, and no other
    for i in range(60, 100):
        _, attrs = render_sample(i, image_size=32, seed=3)
        asked = {r["type"] for r in rows if _index(r["image"]) == i}
        assert asked == {k for k in QUESTION_TYPES if answer_of(k, attrs) is not None}
    items = load_benchmark(paths["benchmark"])  # the reader of `fastenc eval vqa` takes it as is
    assert len(items) == len(rows) and items[0].extra["type"] == rows[0]["type"]
    assert (out / "images").joinpath(f"{_index(rows[0]['image']):09d}.jpg").exists()


def test_instruct_asks_open_and_multiple_choice_questions_with_right_answers(written):
    _, paths = written
    records = json.load(open(paths["instruct"]))
    assert len(records) == 60
    kinds = {"open": 0, "mc": 0}
    for rec in records:
        _, attrs = render_sample(_index(rec["image"]), image_size=32, seed=3)
        turns = rec["conversations"]
        assert turns[0]["value"].startswith("<image>\n") and len(turns) == 4
        for q, a in zip(turns[0::2], turns[1::2]):
            text = q["value"].replace("<image>\n", "")
            if text.startswith("Question: "):
                kinds["mc"] += 1
                options = dict(re.findall(r"^([ABCD])\. (.*)$", text, re.M))
                kind = next(k for k, v in QUESTION_TYPES.items() if text.startswith(f"Question: {v[2]}\n"))
                assert options[a["value"]] == answer_of(kind, attrs)
            else:
                kinds["open"] += 1
                kind = next(k for k, v in QUESTION_TYPES.items() if v[1] == text)
                assert a["value"] == answer_of(kind, attrs)
    assert kinds["open"] > 20 and kinds["mc"] > 20


def test_multiple_choice_prompt_is_the_benchmark_prompt():
    from fastenc.datatools.synth_vqa import mc_prompt
    from fastenc.eval.vqa import VQAItem

    item = multiple_choice("color", "red", np.random.default_rng(0))
    assert item[item["answer"]] == "red"
    expected = prompt_text(VQAItem(0, item["question"], {k: item[k] for k in LETTERS}, item["answer"], "general"))
    assert mc_prompt(item) == expected and expected.startswith("Question: What color is the shape?\nOptions:\nA. ")


def test_answer_letters_are_spread_and_unanswerable_questions_are_not_asked():
    rng = np.random.default_rng(0)
    letters = [multiple_choice("shape", "star", rng)["answer"] for _ in range(400)]
    assert all(80 <= letters.count(k) <= 120 for k in LETTERS)
    attrs = {"word": None, "num_marks": 2, "color": "red", "category": "star", "style": "dots"}
    assert answer_of("word", attrs) is None and answer_of("count", attrs) == "2"
    assert answer_of("style", attrs) == "dotted"
    with pytest.raises(ValueError, match="unknown question type"):
        answer_of("size", attrs)


def test_same_seed_same_files(tmp_path, written):
    _, paths = written
    again = write_synthetic_vqa(str(tmp_path), 60, num_heldout=40, image_size=32, seed=3)
    for key in paths:
        assert open(again[key]).read() == open(paths[key]).read()


def test_text_only_records_state_the_attributes_and_their_letters_follow_from_the_text(tmp_path, written):
    _, plain = written
    paths = write_synthetic_vqa(str(tmp_path), 60, num_heldout=40, image_size=32, seed=3, text_fraction=1.0)
    records = json.load(open(paths["instruct"]))
    # the image records are the same as without text records (their own random stream), in the same order
    assert [r for r in records if "image" in r] == json.load(open(plain["instruct"]))
    text = [r for r in records if "image" not in r]
    assert len(text) == 60 and json.load(open(paths["manifest"]))["text_fraction"] == 1.0
    pattern = re.compile(r"Question: (.*)\nOptions:\nA\. (.*)\nB\. (.*)\nC\. (.*)\nD\. (.*)\nAnswer with")
    for r in text:
        turns = r["conversations"]
        assert all("<image>" not in t["value"] for t in turns) and len(turns) == 4
        facts = turns[0]["value"].split("\n")[0]
        _, attrs = render_sample(int(r["id"].split("-")[1]), image_size=32, seed=3)
        for human, gpt in zip(turns[0::2], turns[1::2]):
            question, *options = pattern.search(human["value"]).groups()
            kind = next(k for k, v in QUESTION_TYPES.items() if v[2] == question)
            right = options[LETTERS.index(gpt["value"])]
            assert right == answer_of(kind, attrs) and right in facts
            assert sum(o == right for o in options) == 1


def test_text_fraction_is_checked(tmp_path):
    with pytest.raises(ValueError, match="text_fraction"):
        write_synthetic_vqa(str(tmp_path), 4, num_heldout=0, image_size=32, text_fraction=1.5)
