"""The LLaVA-style VLM module: image tokens spliced in place, the loss the LM's own, gradients where they belong."""

import pytest
import torch

pytest.importorskip("transformers", reason="the vision-language stage needs transformers (make setup)")

from fastenc.data.conversation import IGNORE, VICUNA_V1, Turn, expand_image_tokens, tokenize_with_labels  # noqa: E402
from fastenc.models import create_vit  # noqa: E402
from fastenc.models.language import IMAGE, llama_from_preset, train_chat_tokenizer  # noqa: E402
from fastenc.models.vlm import VisionLanguageModel, build_projector  # noqa: E402


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    tokenizer = train_chat_tokenizer(["what color is the circle", "red", "a blue square", "USER: ASSISTANT:"] * 10,
                                     vocab_size=300)
    vision = create_vit("vit_test").eval()
    lm = llama_from_preset("llama_tiny", tokenizer)
    return tokenizer, vision, lm


def _batch(tokenizer, vlm, answers=("red", "a blue square")):
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    rows = []
    for answer in answers:
        text, spans = VICUNA_V1.render([Turn("user", "<image>\nwhat color is the circle"), Turn("assistant", answer)])
        rows.append(expand_image_tokens(*tokenize_with_labels(text, spans, tokenizer), image_id, vlm.num_image_tokens))
    length = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    labels = torch.full((len(rows), length), IGNORE)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for r, (i, lab) in enumerate(rows):
        ids[r, :len(i)], labels[r, :len(i)], mask[r, :len(i)] = torch.tensor(i), torch.tensor(lab), 1
    images = torch.randn(len(rows), 3, vlm.encoder.img_size, vlm.encoder.img_size)
    return ids, labels, mask, images


def test_image_tokens_replace_the_image_positions_in_order(parts):
    tokenizer, vision, lm = parts
    vlm = VisionLanguageModel(vision, lm, tokenizer.convert_tokens_to_ids(IMAGE))
    grid = vision.grid_size
    assert vlm.num_image_tokens == grid[0] * grid[1]
    ids, _, _, images = _batch(tokenizer, vlm)
    x = vlm.embed(ids, images)
    is_image = ids == vlm.image_token_id
    expected_img = vlm.projector(vision.forward_intermediates(images, [-2])[0][:, 1:])
    for r in range(ids.shape[0]):
        torch.testing.assert_close(x[r][is_image[r]], expected_img[r])
        torch.testing.assert_close(x[r][~is_image[r]], lm.get_input_embeddings()(ids[r][~is_image[r]]))
    text_only = torch.tensor([[tokenizer.bos_token_id, 5, 6]])  # LLaVA's mix has samples without an image
    torch.testing.assert_close(vlm.embed(text_only, None), lm.get_input_embeddings()(text_only))


def test_the_loss_is_the_lms_own_on_the_spliced_embeddings(parts):
    tokenizer, vision, lm = parts
    vlm = VisionLanguageModel(vision, lm, tokenizer.convert_tokens_to_ids(IMAGE), projector="linear")
    ids, labels, mask, images = _batch(tokenizer, vlm)
    loss = vlm(ids, labels, mask, images)
    logits = lm(inputs_embeds=vlm.embed(ids, images), attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                               ignore_index=IGNORE)
    torch.testing.assert_close(loss, manual)


def test_frozen_towers_get_no_gradient_and_the_projector_does(parts):
    tokenizer, vision, lm = parts
    vlm = VisionLanguageModel(vision, lm, tokenizer.convert_tokens_to_ids(IMAGE))
    for p in [*vision.parameters(), *lm.parameters()]:
        p.requires_grad_(False)
    vlm(*_batch(tokenizer, vlm)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vlm.projector.parameters())
    assert all(p.grad is None for p in [*vision.parameters(), *lm.parameters()])
    for p in [*vision.parameters(), *lm.parameters()]:
        p.requires_grad_(True)


def test_a_wrong_number_of_image_tokens_is_an_error(parts):
    tokenizer, vision, lm = parts
    vlm = VisionLanguageModel(vision, lm, tokenizer.convert_tokens_to_ids(IMAGE))
    ids, _, _, images = _batch(tokenizer, vlm)
    ids[0, (ids[0] == vlm.image_token_id).nonzero()[0]] = tokenizer.pad_token_id  # one image token short
    with pytest.raises(ValueError, match=f"exactly {vlm.num_image_tokens} <image> tokens"):
        vlm.embed(ids, images)
    with pytest.raises(ValueError, match="unknown projector"):
        build_projector("mlp3x", 4, 4)


def _greedy_reference(vlm, ids, image, steps):
    """Greedy decoding the plain way: the whole sequence re-run for every new token, no cache."""
    new = []
    for _ in range(steps):
        logits = vlm.lm(inputs_embeds=vlm.embed(ids, image), attention_mask=torch.ones_like(ids)).logits[:, -1]
        token = int(logits.argmax(dim=-1))
        new.append(token)
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    return new


def test_generate_equals_greedy_decoding_without_cache(parts):
    """VisionLanguage.generate (the LM's generate with its KV cache, from spliced embeddings) against the reference
    loop; with eos_token_id set it stops before the first EOS."""
    tokenizer, vision, lm = parts
    torch.manual_seed(1)
    vlm = VisionLanguageModel(vision, lm, tokenizer.convert_tokens_to_ids(IMAGE)).eval()
    ids, _, mask, images = _batch(tokenizer, vlm, answers=("red",))
    prompt = ids[:, :int(mask.sum()) - 3]  # cut before the answer: a prompt that ends in the user's turn
    want = _greedy_reference(vlm, prompt, images, 8)
    assert vlm.generate(prompt, images, max_new_tokens=8) == want
    stop = want[3]
    assert vlm.generate(prompt, images, max_new_tokens=8, eos_token_id=stop) == want[:want.index(stop)]
