"""Features and targets on a real chat model (SmolLM2-135M-Instruct, its real
tokenizer and chat template, which inserts a default system prompt)."""

import copy

import pytest
import torch
from captum.attr import FeatureAblation, LLMAttribution, Saliency, ShapleyValueSampling

from captum_mllm import (
    Chat,
    ChatInput,
    HFCausalLMAdapter,
    MultimodalLLMAttribution,
    MultimodalLLMGradientAttribution,
)
from captum_mllm.captum_compat import text_template_input
from captum_mllm.errors import InvalidModelError
from captum_mllm.methods import ExactShapleyValues
from captum_mllm.testing import tiny_hf_adapter, tiny_tokenizer
from captum_mllm.words import strip_separators

QUESTION = "What is the capital of France?"


def _decode(inp, positions):
    return inp.model.tokenizer.decode(inp.encoded.input_ids[list(positions)])


def test_user_words_are_the_features_not_the_inserted_system_prompt(smol):
    inp = ChatInput(Chat().user("Hugging Face"), smol)
    assert inp.values == ["Hugging", "Face"]
    assert all(int(inp.encoded.turn[p]) == 0 for f in inp.features for p in f.positions)
    assert _decode(inp, [p for f in inp.features for p in f.positions]) == "Hugging Face"
    # The inserted default prompt ("... trained by Hugging Face") belongs to no turn.
    rendered = "".join(inp.encoded.tokens)
    assert "trained by Hugging Face" in rendered
    inserted = [p for p, t in enumerate(inp.encoded.turn.tolist()) if t < 0]
    assert "trained by Hugging Face" in _decode(inp, inserted)


def test_chinese_characters_are_words_and_keep_their_bytes_whole(smol):
    """SmolLM2 spells a Chinese character in two or three byte tokens: each
    character is a feature of whole characters' bytes, so dropping one leaves
    the others readable (the whole sentence was one feature)."""
    inp = ChatInput(Chat().user("我爱北京"), smol)
    assert inp.values == ["我", "爱", "北", "京"]
    content = [p for f in inp.features for p in f.positions]
    for f in inp.features:
        assert _decode(inp, f.positions) == f.label
        kept = [p for p in content if p not in f.positions]
        assert _decode(inp, kept) == "我爱北京".replace(f.label, "")


@pytest.mark.parametrize(
    "text",
    ["東京です 🗼", "我爱北京, naïve café!", "Paris 🇫🇷 is 日本? no", "e\u0301t\u00e9 👩\u200d💻"],
)
def test_a_token_holding_part_of_a_character_is_labelled_as_captum_labels_it(smol, text):
    """SmolLM2 spells 東 or 🗼 in several byte tokens: each decoded alone to
    "�", so an answer's labels read "�" throughout, and token features
    repeated the character without a mark. The oracle is Captum's own
    pretty tokens (the character, and "[OVERLAP]" on its later tokens)."""
    from captum.attr._core.llm_attr import _convert_ids_to_pretty_tokens

    ids = smol.tokenizer(text, add_special_tokens=False).input_ids
    expected = _convert_ids_to_pretty_tokens(torch.tensor(ids), smol.tokenizer)
    assert any("[OVERLAP]" in t for t in expected)
    assert list(smol.response(torch.tensor(ids)).labels) == expected
    inp = ChatInput(Chat().user(text), smol, text_unit="token", skip=())
    # no feature of spaces or zero-width joiners (Captum's labels a space "")
    assert inp.values == [t for t in expected if strip_separators(t.removesuffix(" [OVERLAP]"))]
    res = MultimodalLLMAttribution(ExactShapleyValues(smol), smol).attribute(
        ChatInput(Chat().user("Say it."), smol), target=text
    )
    assert res.output_tokens == [
        t for t in _convert_ids_to_pretty_tokens(res.target_ids, smol.tokenizer)
    ]


def test_an_input_built_for_another_model_is_refused(smol):
    """A ChatInput holds its model's tokens: explained with another model's
    adapter, the tiny tokenizer's ids were read as SmolLM2's, without a word.
    Another adapter around an equal tokenizer takes the same input."""
    tiny = tiny_hf_adapter()
    inp = ChatInput(Chat().user("Who are you"), tiny)
    with pytest.raises(InvalidModelError, match="built for another model"):
        MultimodalLLMAttribution(FeatureAblation(smol), smol).attribute(inp, target="I am")
    saliency = MultimodalLLMGradientAttribution(Saliency(tiny), tiny)
    with pytest.raises(InvalidModelError, match="built for another model"):
        saliency.attribute(ChatInput(Chat().user("Who are you"), smol), target="I am")
    other = HFCausalLMAdapter(tiny_hf_adapter(seed=1).model, copy.deepcopy(tiny.tokenizer))
    assert tiny.encodes_as(other) and not tiny.encodes_as(smol)
    res = MultimodalLLMAttribution(FeatureAblation(other), other).attribute(inp, target="I am")
    assert res.seq_attr.shape == (3,)


def test_a_word_equal_to_the_role_header_is_the_users_word(smol):
    inp = ChatInput(Chat().system("Be brief.").user("user"), smol)
    assert inp.values == ["user"]
    (position,) = inp.features[0].positions
    assert int(inp.encoded.part[position]) == 0 and int(inp.encoded.turn[position]) == 1
    # The header token "user" comes before it and stays fixed.
    assert inp.encoded.tokens[position - 2 : position] == ["user", "\n"]


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_turn_feature_is_exactly_the_users_turn(smol, system):
    chat = (Chat().system(system) if system else Chat()).user(QUESTION)
    inp = ChatInput(chat, smol, text_unit="turn")
    assert len(inp.features) == 1
    assert _decode(inp, inp.features[0].positions) == f"<|im_start|>user\n{QUESTION}<|im_end|>\n"
    words = ChatInput(chat, smol)
    assert words.values == ["What", "is", "the", "capital", "of", "France"]


def test_replace_baseline_is_never_the_end_of_turn_token(smol):
    assert smol.tokenizer.pad_token == "<|im_end|>"  # why the old default was wrong
    inp = ChatInput(Chat().user(QUESTION), smol, text_baseline="replace")
    assert inp.replace_id not in smol.tokenizer.all_special_ids
    assert smol.tokenizer.decode([inp.replace_id]) == " "


def test_generated_target_drops_the_end_of_turn_token(smol):
    inp = ChatInput(Chat().user(QUESTION), smol)
    attr = MultimodalLLMAttribution(FeatureAblation(smol), smol)
    gen = {"max_new_tokens": 12}
    clean = attr.attribute(inp, gen_args=gen)
    kept = attr.attribute(inp, gen_args=gen, keep_eos=True)
    assert "Paris" in clean.response_text
    assert kept.output_tokens[-1] == "<|im_end|>" and "<|im_end|>" not in clean.output_tokens
    assert kept.target_ids[:-1].tolist() == clean.target_ids.tolist()


QWEN_LIKE = (  # Qwen2.5's template: a default system prompt when there is none
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_LIKE = (  # Llama 3's layout: BOS, headers, content trimmed
    "{{- '<|endoftext|>' }}{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '<|im_end|>\\n\\n' + message['content'] | trim "
    "+ '<|im_end|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant<|im_end|>\\n\\n' }}{%- endif %}"
)


@pytest.mark.parametrize("template", [QWEN_LIKE, LLAMA3_LIKE])
def test_other_templates_keep_features_in_their_turn(template):
    model = tiny_hf_adapter()
    model.tokenizer = _with_template(template)
    for chat in (Chat().user("  You are a fox "), Chat().system("Be brief.").user("system")):
        inp = ChatInput(chat, model)
        user_turn = len(chat) - 1
        assert inp.values == chat[-1].text.split()
        assert all(
            int(inp.encoded.turn[p]) == user_turn and int(inp.encoded.part[p]) == 0
            for f in inp.features
            for p in f.positions
        )
        turn = ChatInput(chat, model, text_unit="turn", roles=("user",))
        text = _decode(turn, turn.features[0].positions)
        assert chat[-1].text.strip() in text and "Qwen" not in text and "Be brief" not in text


def _with_template(template):
    import copy

    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = template
    return tok


def test_a_chat_ending_with_the_answer_explains_that_answer(smol):
    chat = Chat().user(QUESTION).assistant("The capital of France is Paris.")
    inp = ChatInput(chat, smol)
    prompt = "".join(inp.encoded.tokens)
    assert "Paris" not in prompt and prompt.count("<|im_start|>assistant") == 1
    assert prompt.endswith("<|im_start|>assistant\n")
    attr = MultimodalLLMAttribution(FeatureAblation(smol), smol)
    res = attr.attribute(inp)
    assert res.response_text == "The capital of France is Paris."
    assert torch.isfinite(res.seq_attr).all()


@pytest.mark.parametrize(
    "method, kwargs", [(FeatureAblation, {}), (ShapleyValueSampling, {"n_samples": 2})]
)
def test_word_values_equal_stock_captums_on_smollm2(smol, method, kwargs):
    """Stock Captum on the same chat (its template rendered by SmolLM2's chat
    template, default system prompt included) gives our values."""
    inp = ChatInput(Chat().user(QUESTION), smol)
    target = smol.tokenizer("The capital of France is Paris.", add_special_tokens=False,
                            return_tensors="pt").input_ids  # fmt: skip
    torch.manual_seed(0)
    stock = LLMAttribution(method(smol.model), smol.tokenizer).attribute(
        text_template_input(inp), target=target[0], forward_in_tokens=False, **kwargs
    )
    torch.manual_seed(0)
    ours = MultimodalLLMAttribution(method(smol), smol).attribute(
        inp, target=target, perturbations_per_eval=8, **kwargs
    )
    assert ours.input_tokens == [v.strip() for v in stock.input_tokens]
    assert ours.output_tokens == stock.output_tokens
    torch.testing.assert_close(ours.token_attr, stock.token_attr, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.seq_attr, stock.seq_attr, atol=1e-4, rtol=0)
    assert ours.seq_attr.abs().max() > 0.5


@pytest.mark.parametrize(
    "question, answer, decisive",
    [
        ("What is the capital of France?", "Paris", "France"),
        ("What is the capital of Germany?", "Berlin", "Germany"),
        ("What is the capital of Spain?", "Madrid", "Spain"),
    ],
)
def test_the_decisive_word_carries_the_answer(smol, question, answer, decisive):
    inp = ChatInput(Chat().user(question), smol)
    res = MultimodalLLMAttribution(ExactShapleyValues(smol), smol).attribute(
        inp, target=answer, perturbations_per_eval=64
    )
    first = res.token_attr[0]  # the answer's first token: it carries the fact
    assert inp.values[int(first.argmax())] == decisive
    assert inp.values[int(res.seq_attr.argmax())] == decisive


@pytest.mark.parametrize(
    "passages, question, answer",
    [
        (
            ["Bananas are a yellow fruit.", "The capital city of France is Paris.",
             "Cats sleep a lot."],
            "Using the passages, what is the capital city of France?",
            "The capital city of France is Paris.",
        ),
        (
            ["The Eiffel Tower is in Paris.", "Mount Fuji is the highest mountain in Japan.",
             "Penguins live in Antarctica."],
            "Using the passages, what is the highest mountain in Japan?",
            "The highest mountain in Japan is Mount Fuji.",
        ),
    ],
)  # fmt: skip
def test_the_passage_holding_the_answer_outweighs_the_others(smol, passages, question, answer):
    """A retrieval-augmented prompt, a passage a paragraph: the answer rests on
    the passage that holds it, more than on any other passage."""
    text = "\n\n".join([*passages, question])
    inp = ChatInput(Chat().user(text), smol, text_unit="paragraph")
    assert inp.values == [*passages, question]
    res = MultimodalLLMAttribution(ExactShapleyValues(smol), smol).attribute(inp, target=answer)
    holding = 1
    others = [float(res.seq_attr[i]) for i in (0, 2)]
    assert float(res.seq_attr[holding]) > max(others) + 1.0, res.seq_attr


@pytest.mark.parametrize(
    "who, answer, foil, for_answer, for_foil",
    [("Bob", "Rome", "Paris", 1, 0), ("Alice", "Paris", "Rome", 0, 1)],
)
def test_why_this_city_rather_than_that_one(smol, who, answer, foil, for_answer, for_foil):
    """A contrastive explanation (ContrastiveTarget): the sentence placing the
    person in the answer's city is the most for the answer, the one placing
    the other person in the foil's city the most against it."""
    from captum_mllm import ContrastiveTarget

    text = (
        "Alice lives in Paris. Bob lives in Rome. Carol lives in Oslo. "
        f"Where does {who} live? Answer with the city only."
    )
    inp = ChatInput(Chat().user(text), smol, text_unit="sentence")
    attr = MultimodalLLMAttribution(ExactShapleyValues(smol), smol, target=ContrastiveTarget(foil))
    res = attr.attribute(inp, target=answer)
    assert int(res.seq_attr.argmax()) == for_answer, res.seq_attr
    assert int(res.seq_attr.argmin()) == for_foil, res.seq_attr
    assert float(res.seq_attr[for_answer]) > 1.0 and float(res.seq_attr[for_foil]) < -1.0
