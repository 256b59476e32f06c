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

import json

from fastenc.data.transforms import IMAGE_EXTENSIONS, CorruptSample, decode_image

IGNORE = -100
"""Label of a position that carries no loss (PyTorch's cross_entropy ignore_index)."""
IMAGE_TOKEN = "<image>"
ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}

OPTION_LETTERS = ("A", "B", "C", "D")
MULTIPLE_CHOICE_PROMPT = ("Question: {question}\nOptions:\n{options}\n"
                          "Answer with the option's letter from the given choices directly.")
"""The paper's multiple-choice prompt (VMCBench's): what `fastenc eval vqa` asks and synth-vqa trains on."""


def multiple_choice_prompt(question: str, options: dict) -> str:
    """The multiple-choice prompt for {letter: option text} (empty options left out by the caller)."""
    lines = "\n".join(f"{letter}. {text}" for letter, text in options.items())
    return MULTIPLE_CHOICE_PROMPT.format(question=question, options=lines)


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
        user turn, and the text ends with the assistant prefix without its trailing spaces, ready for generation: in
        training the space before an answer goes into the answer's first token (" red"), so a prompt that ended in
        a lone space token would ask the model to continue from a token it never saw there (LLaVA's prompt ends with
        "ASSISTANT:" for the same reason)."""
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
        text = "".join(parts)
        return (text.rstrip(" ") if generation_prompt else text), spans


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


class TemplateChatFormat:
    """A Hugging Face tokenizer's own chat template (`tokenizer.chat_template`, Jinja) with the ChatFormat interface.

    Answer spans are found by rendering prefixes: the text of turns[:i] with the generation prompt must be a prefix
    of the text of turns[:i+1], and the answer (with the template's end-of-turn marker) is the difference. A template
    that does not extend its own prefixes that way cannot have its answers located: a ValueError says so."""

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template: use chat_format vicuna_v1")
        self.tokenizer = tokenizer
        self.name = "tokenizer"

    def _text(self, turns: list[Turn], generation_prompt: bool) -> str:
        messages = [{"role": t.role, "content": t.text} for t in turns]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def render(self, turns: list[Turn], *, generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        if generation_prompt != bool(turns and turns[-1].role == "user"):
            raise ValueError("a generation prompt needs turns that end with the user's question (and only then)")
        if generation_prompt:
            return self._text(turns, True), []
        spans = []
        for i in range(1, len(turns), 2):
            before, after = self._text(turns[:i], True), self._text(turns[:i + 1], False)
            if not after.startswith(before):
                raise ValueError("the tokenizer's chat template does not render a conversation as an extension of "
                                 "its generation prompt, so its answers cannot be located: use chat_format vicuna_v1")
            spans.append((len(before), len(after)))
        return self._text(turns, False), spans


CHAT_FORMATS = ("auto", "vicuna_v1", "tokenizer")


def chat_format(name: str, tokenizer):
    """The chat format `name`: vicuna_v1 (LLaVA-1.5's), tokenizer (the LM tokenizer's own template), or auto (the
    tokenizer's template where it has one, else vicuna_v1)."""
    if name not in CHAT_FORMATS:
        raise ValueError(f"unknown chat_format {name!r} (known: {', '.join(CHAT_FORMATS)})")
    if name == "tokenizer" or (name == "auto" and getattr(tokenizer, "chat_template", None)):
        return TemplateChatFormat(tokenizer)
    return VICUNA_V1


class ConversationEncoder:
    """One LLaVA record -> (input_ids, labels) ready for the model: rendered, tokenized, `<image>` expanded, cut.

        record = {"image": "coco/0001.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat ..."}, ...]}

    A record with an image needs one `<image>` in its text; as in LLaVA, one that has none gets "<image>\\n" before
    its first question. A record without an image must not mention one. Sequences longer than max_length are cut
    (as LLaVA does); a cut through the image tokens, or one that leaves no supervised token, is a CorruptSample.
    Picklable (the loader's workers call it)."""

    def __init__(self, tokenizer, fmt, *, image_token_id: int, num_image_tokens: int, max_length: int):
        self.tokenizer, self.fmt = tokenizer, fmt
        self.image_token_id, self.num_image_tokens = int(image_token_id), int(num_image_tokens)
        self.max_length = int(max_length)

    def __call__(self, record: dict, *, has_image: bool) -> tuple[list[int], list[int]]:
        if not isinstance(record, dict) or "conversations" not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise CorruptSample(f"the record has no 'conversations' (found {keys})")
        turns = parse_llava_conversations(record["conversations"])
        mentions = sum(t.text.count(IMAGE_TOKEN) for t in turns)
        if has_image and mentions == 0:
            turns[0] = Turn("user", f"{IMAGE_TOKEN}\n{turns[0].text}")
        elif mentions > (1 if has_image else 0):
            raise CorruptSample(f"the conversation mentions {IMAGE_TOKEN} {mentions} times for "
                                f"{'one image' if has_image else 'no image'}")
        text, answers = self.fmt.render(turns)
        add_bos = not (self.tokenizer.bos_token and text.startswith(self.tokenizer.bos_token))
        ids, labels = tokenize_with_labels(text, answers, self.tokenizer, add_bos=add_bos)
        ids, labels = expand_image_tokens(ids, labels, self.image_token_id, self.num_image_tokens)
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if has_image and ids.count(self.image_token_id) != self.num_image_tokens:
            raise CorruptSample(f"max_length {self.max_length} cuts through the image's {self.num_image_tokens} "
                                "tokens")
        if all(label == IGNORE for label in labels):
            raise CorruptSample(f"no answer token within max_length {self.max_length}")
        return ids, labels

    def prompt(self, question: str, *, has_image: bool) -> list[int]:
        """The token ids of a generation prompt for one question (the answer comes next)."""
        turns = [Turn("user", question if (not has_image or IMAGE_TOKEN in question)
                      else f"{IMAGE_TOKEN}\n{question}")]
        text, _ = self.fmt.render(turns, generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.tokenizer.bos_token_id is not None and not text.startswith(self.tokenizer.bos_token or "\0"):
            ids = [self.tokenizer.bos_token_id, *ids]
        return expand_image_tokens(ids, [IGNORE] * len(ids), self.image_token_id, self.num_image_tokens)[0]


def load_record(raw) -> dict:
    """A sample's conversation record: a dict already (a LLaVA JSON's entry) or the bytes of a shard's .json."""
    if isinstance(raw, dict):
        return raw
    try:
        record = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptSample(f".json is not UTF-8 JSON ({e})") from e
    if not isinstance(record, dict):
        raise CorruptSample(f".json holds a {type(record).__name__}, not a record with 'conversations'")
    return record


class ConversationSample:
    """The torch path's sample_fn for conversations: {.json record, image (optional)} -> {"input_ids" [L] int64,
    "labels" [L] int64, "image" [3, S, S] uint8 (zeros for a text-only record)}.

    The image gets the encoder's eval transform (`image_transform`, uint8 out); a record whose "image" names a file
    the sample lacks is a CorruptSample (counted, skipped). Picklable."""

    def __init__(self, image_transform, encoder: ConversationEncoder, image_size: int):
        self.image_transform, self.encoder, self.image_size = image_transform, encoder, int(image_size)

    def __call__(self, sample: dict) -> dict:
        import torch

        where = f"sample {sample.get('__key__', '?')!r}" + (f" in {sample['__url__']}" if "__url__" in sample else "")
        try:
            if "json" not in sample:
                raise CorruptSample("no conversation (.json)")
            record = load_record(sample["json"])
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            if ext is None and record.get("image"):
                raise CorruptSample(f"its record names image {record['image']!r}, which is missing")
            ids, labels = self.encoder(record, has_image=ext is not None)
            image = (self.image_transform(decode_image(sample[ext])) if ext is not None
                     else torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8))
        except CorruptSample as e:
            raise CorruptSample(f"{where}: {e}") from e
        return {"input_ids": torch.tensor(ids, dtype=torch.int64), "labels": torch.tensor(labels, dtype=torch.int64),
                "image": image}
