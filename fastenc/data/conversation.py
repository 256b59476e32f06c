"""Conversations for the vision-language stage: LLaVA's records -> token ids and labels, answers only supervised.

    turns = parse_llava_conversations(record["conversations"])     # [Turn("user", ...), Turn("assistant", ...), ...]
    text, answers = VICUNA_V1.render(turns)                         # the prompt text and its answers' char spans
    ids, labels = tokenize_with_labels(text, answers, tokenizer)    # labels: IGNORE outside the answers

Labels come from character spans, not from tokenizing pieces and hoping their lengths add up (LLaVA's code does the
latter, and when a tokenizer merges across a piece boundary it masks the whole sample without a word). Here the
whole text is tokenized once with offsets; a token is supervised when it lies inside an answer span. A token that
straddles an answer boundary means the labels cannot be placed exactly: the sample raises MisalignedSample (a
CorruptSample, so the data loaders skip it and count it in `num_skipped`), never a silently unsupervised sample.

`<image>` in a user turn marks where the image goes. The tokenizer must know it as one special token; the model
replaces that token by the image's projected patch tokens (`expand_image_tokens` makes the room for them).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastenc.data.transforms import CorruptSample

IGNORE = -100
"""Label of a position that carries no loss (PyTorch's cross_entropy ignore_index)."""
IMAGE_TOKEN = "<image>"
ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}


class MisalignedSample(CorruptSample):
    """The labels of a sample cannot be placed on its tokens exactly (a token straddles an answer boundary)."""


@dataclass(frozen=True)
class Turn:
    role: str
    """"user" or "assistant"."""
    text: str


def parse_llava_conversations(conversations) -> list[Turn]:
    """LLaVA's `conversations` list ([{"from": "human"|"gpt", "value": ...}, ...]) as turns; CorruptSample if it is
    not user/assistant pairs starting with the user, or a turn is empty."""
    if not isinstance(conversations, list) or not conversations:
        raise CorruptSample("conversations must be a non-empty list of {from, value} turns")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise CorruptSample(f"conversation turn {i} is not {{from: human|gpt, value: text}}: {turn!r:.80}")
        role = ROLES[turn["from"]]
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise CorruptSample(f"conversation turn {i} is from {turn['from']!r}: turns must alternate human, gpt, "
                                "... starting with human")
        if not turn["value"].strip():
            raise CorruptSample(f"conversation turn {i} is empty")
        turns.append(Turn(role, turn["value"]))
    if len(turns) % 2:
        raise CorruptSample("the conversation ends with a human turn that has no answer")
    return turns


@dataclass(frozen=True)
class ChatFormat:
    """A plain-text chat template:

        system + system_suffix + (user_prefix + question + user_suffix + assistant_prefix + answer + answer_suffix)*

    Each answer with its suffix (the end-of-turn marker, e.g. "</s>") is what is supervised."""

    name: str
    system: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    answer_suffix: str

    def render(self, turns: list[Turn], *, generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """(text, [(start, end) character span of each supervised answer]). generation_prompt: the turns end with a
        user turn, and the text ends with the assistant prefix, ready for generation."""
        if generation_prompt != bool(turns and turns[-1].role == "user"):
            raise ValueError("a generation prompt needs turns that end with the user's question (and only then)")
        parts, spans = [self.system + self.system_suffix], []
        pos = len(parts[0])
        for turn in turns:
            if turn.role == "user":
                piece = self.user_prefix + turn.text + self.user_suffix + self.assistant_prefix
            else:
                piece = turn.text + self.answer_suffix
                spans.append((pos, pos + len(piece)))
            parts.append(piece)
            pos += len(piece)
        return "".join(parts), spans


VICUNA_V1 = ChatFormat(
    name="vicuna_v1",
    system="A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
           "detailed, and polite answers to the user's questions.",
    system_suffix=" ",
    user_prefix="USER: ",
    user_suffix=" ",
    assistant_prefix="ASSISTANT: ",
    answer_suffix="</s>",
)
"""LLaVA-1.5's conversation format for Vicuna (conv_vicuna_v1): "<system> USER: <q> ASSISTANT: <a></s>USER: ..."."""


def tokenize_with_labels(text: str, answers: list[tuple[int, int]], tokenizer, *,
                         add_bos: bool = True) -> tuple[list[int], list[int]]:
    """(input ids, labels) of `text`: labels are the ids inside the answer spans and IGNORE elsewhere.

    `tokenizer`: a Hugging Face fast tokenizer (it reports character offsets). MisalignedSample when a token crosses
    an answer boundary (whitespace at a token's edge does not count), or an answer gets no token at all."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    labels = [IGNORE] * len(ids)
    covered = [0] * len(answers)
    for t, (start, end) in enumerate(offsets):
        piece = text[start:end]
        if piece.strip():  # a token's whitespace edges may belong to either side of a boundary
            start, end = start + len(piece) - len(piece.lstrip()), end - len(piece) + len(piece.rstrip())
        for a, (lo, hi) in enumerate(answers):
            if lo <= start < end <= hi:
                labels[t] = ids[t]
                covered[a] += piece.strip() != ""
            elif start < hi and end > lo and piece.strip():
                raise MisalignedSample(f"token {t} {text[start:end]!r} straddles the boundary of answer {a} "
                                       f"(characters {lo}-{hi}): its label cannot be placed exactly")
    if not all(covered):
        raise MisalignedSample(f"answer {covered.index(0)} has no token of its own")
    if add_bos and tokenizer.bos_token_id is not None:
        ids, labels = [tokenizer.bos_token_id, *ids], [IGNORE, *labels]
    return ids, labels


def expand_image_tokens(ids: list[int], labels: list[int], image_token_id: int,
                        num_image_tokens: int) -> tuple[list[int], list[int]]:
    """Each `<image>` id repeated num_image_tokens times (the places the model fills with the image's projected
    patch tokens), unsupervised. CorruptSample if an image token falls inside an answer."""
    out_ids, out_labels = [], []
    for i, label in zip(ids, labels):
        if i == image_token_id:
            if label != IGNORE:
                raise CorruptSample(f"{IMAGE_TOKEN} inside an answer: the image goes in a user turn")
            out_ids += [image_token_id] * num_image_tokens
            out_labels += [IGNORE] * num_image_tokens
        else:
            out_ids.append(i)
            out_labels.append(label)
    return out_ids, out_labels
