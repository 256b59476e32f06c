"""Conversations for the vision-language stage: parsing, the Vicuna format, labels only on answers, <image>."""

import pytest

pytest.importorskip("transformers", reason="the vision-language stage needs transformers (make setup)")

from fastenc.data.conversation import (  # noqa: E402
    IGNORE,
    VICUNA_V1,
    MisalignedSample,
    Turn,
    expand_image_tokens,
    parse_llava_conversations,
    tokenize_with_labels,
)
from fastenc.data.transforms import CorruptSample  # noqa: E402
from fastenc.models.language import IMAGE, train_chat_tokenizer  # noqa: E402

CAPTIONS = ["a red circle on a striped background", "a small blue square", "the word cat written in green",
            "What is the color of the shape?", "Describe the image briefly.", "USER: ASSISTANT:"] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_chat_tokenizer(CAPTIONS, vocab_size=300)


def _llava(*pairs):
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


def test_parse_llava_conversations_checks_the_turns():
    turns = parse_llava_conversations(_llava(("<image>\nWhat color?", "Red."), ("Shape?", "A circle.")))
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
    for bad, why in [([], "non-empty"), (_llava(("q", "a"))[::-1], "alternate"), (_llava(("q", "a"))[:1], "no answer"),
                     ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}], "empty"),
                     ([{"from": "bot", "value": "q"}], "from: human|gpt")]:
        with pytest.raises(CorruptSample, match=why):
            parse_llava_conversations(bad)


def test_vicuna_v1_is_llava_15s_prompt():
    turns = parse_llava_conversations(_llava(("<image>\nWhat color?", "Red."), ("Shape?", "A circle.")))
    text, spans = VICUNA_V1.render(turns)
    assert text == (VICUNA_V1.system + " USER: <image>\nWhat color? ASSISTANT: Red.</s>"
                    "USER: Shape? ASSISTANT: A circle.</s>")
    assert [text[a:b] for a, b in spans] == ["Red.</s>", "A circle.</s>"]
    prompt, none = VICUNA_V1.render(turns[:1], generation_prompt=True)
    assert prompt.endswith("What color? ASSISTANT:") and none == []  # the answer's own token carries the space
    with pytest.raises(ValueError, match="generation prompt"):
        VICUNA_V1.render(turns, generation_prompt=True)


def test_labels_only_on_answers(tokenizer):
    turns = parse_llava_conversations(_llava(("<image>\nWhat is the color of the shape?", "red"),
                                             ("Describe the image briefly.", "a red circle on a striped background")))
    text, spans = VICUNA_V1.render(turns)
    ids, labels = tokenize_with_labels(text, spans, tokenizer)
    assert len(ids) == len(labels) and ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE
    supervised = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels))
    assert tokenizer.decode(supervised).replace(" ", "") == "red</s>aredcircleonastripedbackground</s>"
    assert tokenizer.convert_tokens_to_ids(IMAGE) in ids  # one special token, never split
    assert ids.count(tokenizer.eos_token_id) == 2  # "</s>" in the text is the end-of-sequence token


def test_a_token_across_an_answer_boundary_is_an_error_not_a_silent_mask(tokenizer):
    text = "a red circle on a striped background"
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    start, end = max(offsets, key=lambda o: o[1] - o[0])  # the longest token ...
    assert end - start >= 3
    with pytest.raises(MisalignedSample, match="straddles"):
        tokenize_with_labels(text, [(start + 2, len(text))], tokenizer)  # ... cut inside by the answer's start
    with pytest.raises(MisalignedSample, match="no token of its own"):
        tokenize_with_labels(text, [(12, 12)], tokenizer)
    assert issubclass(MisalignedSample, CorruptSample)  # so the loaders skip and count it


def test_image_tokens_expand_in_place(tokenizer):
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    text, spans = VICUNA_V1.render([Turn("user", "<image>\nWhat color?"), Turn("assistant", "red")])
    ids, labels = tokenize_with_labels(text, spans, tokenizer)
    out_ids, out_labels = expand_image_tokens(ids, labels, image_id, 5)
    at = ids.index(image_id)
    assert out_ids[at:at + 5] == [image_id] * 5 and out_labels[at:at + 5] == [IGNORE] * 5
    assert out_ids[:at] == ids[:at] and out_ids[at + 5:] == ids[at + 1:] and out_labels[at + 5:] == labels[at + 1:]
    with pytest.raises(CorruptSample, match="inside an answer"):
        expand_image_tokens([image_id], [image_id], image_id, 5)
