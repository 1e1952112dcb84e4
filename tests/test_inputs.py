import copy
import warnings

import pytest
import torch
from captum.attr import FeatureAblation
from conftest import FALCON_TEMPLATE, THINKING_TEMPLATE, TOOL_TEMPLATE

from captum_mllm import Chat, ChatInput
from captum_mllm.errors import (
    ChatTemplateError,
    InvalidBaselineError,
    InvalidContentError,
    InvalidGroupsError,
    InvalidModelError,
    InvalidOptionError,
    InvalidRoleError,
    NoFeaturesError,
)
from captum_mllm.testing import CHATML_TEMPLATE


def test_words_keep_the_punctuation_unicode_keeps_inside_them(model):
    """Numbers and abbreviations were cut at their punctuation: "3.14" gave the
    features "3" and "14", "2,000" two, "U.S.A." three letters. Words follow
    Unicode's word boundaries (UAX #29) now, and a full stop inside one ends
    no sentence."""
    from captum_mllm.words import sentence_spans, word_spans

    text = "It costs 2,000 dollars, not 3.14 (e.g. in the U.S.A.). Don't pay"
    assert [text[a:b] for a, b in word_spans(text)] == [
        "It", "costs", "2,000", "dollars", ",", "not", "3.14", "(", "e.g", ".", "in", "the",
        "U.S.A", ".).", "Don't", "pay",
    ]  # fmt: skip
    assert [text[a:b] for a, b in sentence_spans(text)] == [
        "It costs 2,000 dollars, not 3.14 (e.g. in the U.S.A.).", "Don't pay",
    ]  # fmt: skip
    # a Hebrew letter keeps a geresh or an apostrophe after it (UAX #29's WB7a); English does not
    hebrew = "ל׳ ול' ג'ירפה, dogs' snake_"
    assert [hebrew[a:b] for a, b in word_spans(hebrew)] == [
        "ל׳", "ול'", "ג'ירפה", ",", "dogs", "'", "snake_",
    ]  # fmt: skip
    inp = ChatInput(Chat().user(text), model)
    assert inp.values == ["It", "costs", "2,000", "dollars", "not", "3.14", "e.g", "in", "the",
                          "U.S.A", "Don't", "pay"]  # fmt: skip
    for f in inp.features:  # each feature's tokens spell it
        assert model.tokenizer.decode(inp.encoded.input_ids[list(f.positions)]).strip() == f.label


def test_thai_is_split_into_words(model):
    """Thai is written without spaces, and Unicode's rules leave a run of its
    letters whole: a Thai sentence was one feature. Oracle: BudouX's own
    parse; a feature still holds whole tokens and whole grapheme clusters."""
    import budoux
    import regex

    from captum_mllm.words import word_spans

    text = "ฉันชอบกินข้าวผัดมาก สวัสดีครับ"
    words = [text[a:b] for a, b in word_spans(text)]
    parser = budoux.load_default_thai_parser()
    assert words == [w for part in text.split() for w in parser.parse(part)]
    assert len(words) >= 6
    mixed = "ABCฉันชอบ123"  # a run of Thai inside a word is cut from its neighbours
    assert [mixed[a:b] for a, b in word_spans(mixed)] == ["ABC", "ฉัน", "ชอบ", "123"]
    inp = ChatInput(Chat().user(text), model)
    assert len(inp.values) >= 4  # words that share a token are one feature
    assert "".join(inp.values) == text.replace(" ", "")
    clusters = {m.end() for m in regex.finditer(r"\X", text)} | {0}
    assert all({a, b} <= clusters for a, b in word_spans(text))
    for f in inp.features:  # each feature's tokens spell it
        assert model.tokenizer.decode(inp.encoded.input_ids[list(f.positions)]).strip() == f.label
    # a spoken Thai transcript's words, as an aligner times them: the same words
    from captum_mllm.words import spoken_word_spans

    assert spoken_word_spans(text) == word_spans(text)
    said = "“ฉันชอบ” กิน, ok?"
    assert [said[a:b] for a, b in spoken_word_spans(said)] == ["“ฉัน", "ชอบ”", "กิน,", "ok?"]


def test_japanese_is_split_into_phrases(model):
    """Unicode's rules gave each kanji alone and joined a particle to the next
    word: 東|京|は|日|本|の, 今|日|はとても. A feature is now one of BudouX's
    phrases (a word with its particles), punctuation apart."""
    import budoux

    from captum_mllm.words import spoken_word_spans, word_spans

    text = "今日はとても暑いので、水をたくさん飲んでください。東京は日本の首都です。"
    phrases = budoux.load_default_japanese_parser().parse(text)
    words = [text[a:b] for a, b in word_spans(text)]
    assert [w for w in words if w not in "、。"] == [p.rstrip("、。") for p in phrases]
    assert words[:4] == ["今日は", "とても", "暑いので", "、"]
    assert [text[a:b] for a, b in spoken_word_spans(text)] == phrases  # with their 、 and 。
    inp = ChatInput(Chat().user(text), model)
    assert "".join(inp.values) == text.replace("、", "").replace("。", "")
    for f in inp.features:  # each feature's tokens spell it
        assert model.tokenizer.decode(inp.encoded.input_ids[list(f.positions)]).strip() == f.label
    chinese = "北京是中国的首都。"  # no kana: a character a word, as before
    assert [chinese[a:b] for a, b in word_spans(chinese)][:2] == ["北", "京"]


def test_word_features_skip_punctuation_and_template(model, chat):
    inp = ChatInput(chat, model)
    assert inp.values == ["Who", "are", "you", "my", "friend"]
    assert inp.to_tensor().shape == (1, 5)
    assert all(f.role == "user" and f.turn == 1 and f.modality == "text" for f in inp.features)
    # "friend" is split into several tokens by the tiny BPE: one feature covers them all.
    friend = inp.features[4].positions
    assert len(friend) > 1
    assert "".join(inp.encoded.tokens[p] for p in friend).strip() == "friend"
    # The system prompt is left untouched and becomes the reusable prefix.
    assert inp.prefix_len == min(inp.features[0].positions)


def test_a_chat_input_shows_its_features_in_a_notebook(model):
    """A notebook showed '<captum_mllm.inputs.ChatInput object at 0x...>'."""
    inp = ChatInput(Chat().user("one two three four five six seven eight nine ten"), model)
    shown = repr(inp)
    assert shown.startswith("ChatInput(10 features (10 text): ['one', 'two', 'three', ")
    assert "'eight', ... (2 more)]; roles=('user',), text_unit='word'" in shown
    assert "'nine'" not in shown and shown.endswith("model=HFCausalLMAdapter)")
    assert repr(ChatInput(Chat().user("one"), model)).startswith("ChatInput(1 feature (1 text): ")


def test_token_and_turn_units(model, chat):
    tokens = ChatInput(chat, model, text_unit="token")
    assert len(tokens.values) > 5
    assert "," not in tokens.values and "?" not in tokens.values
    keep_punct = ChatInput(chat, model, text_unit="token", skip=("special",))
    assert "," in keep_punct.values
    # One name alone is one entry, as roles= takes it, not its letters.
    one = ChatInput(Chat().user("I saw a cat , p u n !"), model, skip="punctuation")
    assert one.values == ["I", "saw", "a", "cat", "p", "u", "n"]
    # A misspelt kind is a literal word that skips nothing: it kept "," silently.
    for typo in ("Punctuation", "specials"):
        with pytest.warns(UserWarning, match="did you mean"):
            assert "," in ChatInput(chat, model, skip=(typo,)).values
    said = ChatInput(Chat().user("Special offers, special prices"), model, skip="Special")
    assert said.values == ["offers", ",", "special", "prices"]  # a word the chat holds: no warning
    with pytest.raises(InvalidOptionError):  # it was compared to strings and skipped nothing
        ChatInput(chat, model, skip=[0])
    turns = ChatInput(chat, model, roles=("system", "user"), text_unit="turn")
    assert turns.values == ["[system 0]", "[user 1]"]
    # A turn feature covers its template tokens too: dropping it removes the message.
    enc = turns.encoded
    masked = turns.to_model_input(torch.tensor([[0.0, 1.0]]))
    kept = enc.input_ids[masked.present[0]]
    text = model.tokenizer.decode(kept)
    assert "system" not in text and "helpful" not in text and "friend" in text


def test_drop_removes_exactly_the_feature_positions(model, chat):
    inp = ChatInput(chat, model)
    coalitions = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    masked = inp.to_model_input(coalitions)
    assert masked.present.shape == (3, len(inp.encoded))
    dropped = set(inp.features[1].positions) | set(inp.features[4].positions)
    assert set((~masked.present[0]).nonzero().flatten().tolist()) == dropped
    assert bool(masked.present[1].all())
    rows = masked.rows()
    assert len(rows[0]) == len(inp.encoded) - len(dropped)
    assert model.tokenizer.decode(rows[0]).count("are") == 1  # only the system prompt's


def test_replace_baseline_keeps_length(model, chat):
    inp = ChatInput(chat, model, text_baseline="replace")
    space = model.tokenizer.encode(" ", add_special_tokens=False)
    assert [inp.replace_id] == space and inp.replace_id not in model.tokenizer.all_special_ids
    full = inp.to_model_input().rows()[0]
    row = inp.to_model_input(torch.tensor([[0, 1, 1, 1, 1]])).rows()[0]
    assert len(row) == len(inp.encoded)
    added = (row == inp.replace_id).sum() - (full == inp.replace_id).sum()
    assert added == len(inp.features[0].positions)
    start = "<|im_start|>"
    by_token = ChatInput(chat, model, text_baseline=start, allow_special_baseline=True)
    assert by_token.replace_id == model.tokenizer.convert_tokens_to_ids(start)


def test_groups_merge_features(model, chat):
    inp = ChatInput(chat, model, groups=["q", "q", "q", "f", "f"])
    assert inp.values == ["Who are you", "my friend"]
    assert inp.features[0].positions == tuple(
        sorted(p for f in ChatInput(chat, model).features[:3] for p in f.positions)
    )
    with pytest.raises(InvalidGroupsError):
        ChatInput(chat, model, groups=[0, 1])


def test_a_group_across_turns_belongs_to_none_of_them(model, chat):
    # It was the first turn's: by_role gave the system a user word's share, and
    # the Owen tree put that word inside the system turn's node.
    two = chat.user("Who is that?")
    inp = ChatInput(two, model, roles=("system", "user"), groups=[0, 1, 2, 3, 4, 0, *range(5, 12)])
    assert inp.values[0] == "You Who"
    first = inp.features[0]
    assert (first.turn, first.role) == (-1, "mixed")
    assert {(f.turn, f.role) for f in inp.features[1:]} == {(0, "system"), (1, "user"), (2, "user")}
    tree = inp.feature_tree()
    assert tree[-1] == 0 and all(0 not in _leaves(node) for node in tree[:-1])
    users = ChatInput(two, model, groups=[0, 1, 2, 3, 4, 0, 5, 6])  # two user turns
    assert (users.features[0].turn, users.features[0].role) == (-1, "user")


def _leaves(node):
    return [node] if isinstance(node, int) else [x for child in node for x in _leaves(child)]


def test_messages_accepted_and_errors(model):
    inp = ChatInput([{"role": "user", "content": "Who are you?"}], model)
    assert inp.values == ["Who", "are", "you"]
    with pytest.raises(NoFeaturesError):
        ChatInput(Chat().user("?!"), model)
    no_user = r"no turn with roles \('user',\) \(it has \['system'\]\)"
    with pytest.raises(NoFeaturesError, match=no_user):
        ChatInput(Chat().system("Be brief."), model)  # no user turn: not "after skipping"
    with pytest.raises(NoFeaturesError, match="final assistant turn is the answer"):
        ChatInput(Chat().user("Hi").assistant("Hello there."), model, roles=("assistant",))
    with pytest.raises(InvalidOptionError):
        ChatInput(Chat().user("hi"), model, text_unit="paragraphs")  # a misspelt unit
    with pytest.raises(InvalidRoleError):
        ChatInput(Chat().user("hi"), model, roles=("robot",))
    with pytest.raises(InvalidContentError):
        ChatInput(Chat().user("hi", audio=torch.zeros(1600), sample_rate=16000), model)


# Part 9a regressions ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, words",
    [
        ("I love 🍕 and 👍🏽", ["I", "love", "🍕", "and", "👍🏽"]),  # emoji are words
        ("We 👨\u200d👩\u200d👧 here", ["We", "👨\u200d👩\u200d👧", "here"]),
        ("Cafe\u0301 time", ["Cafe\u0301", "time"]),  # the accent stays with its letter
        ("hello\u200bworld", ["hello", "world"]),  # no invisible feature
        ("don't stop, ok?!", ["don't", "stop", "ok"]),
        ("C++ costs $5", ["C++", "costs", "$5"]),  # symbols are not punctuation
        ("我爱北京", ["我", "爱", "北", "京"]),  # Chinese characters: a word each
        ("我的iPhone坏了, ok", ["我", "的", "iPhone", "坏", "了", "ok"]),
    ],
)
def test_words_follow_graphemes_and_keep_symbols(model, text, words):
    inp = ChatInput(Chat().user(text), model)
    assert inp.values == words
    # Each word's tokens span exactly that word (plus a leading separator).
    enc = inp.encoded
    part = enc.part_texts[(0, 0)]
    for f in inp.features:
        start = min(int(enc.char_start[p]) for p in f.positions)
        end = max(int(enc.char_end[p]) for p in f.positions)
        assert part[start:end].lstrip(" \u200b") == f.label


def test_a_token_across_words_joins_them_into_one_feature(model):
    """A token that spells more than its first word ("北京", one token for
    two characters; "you?" with its question mark) made a feature labelled
    with the first word alone, and the second word vanished. The words it
    reaches are one feature now, labelled with all of them."""
    from captum_mllm import HFCausalLMAdapter

    tokenizer = copy.deepcopy(model.tokenizer)  # shared: the other tests keep its vocabulary
    tokenizer.add_tokens(["北京", "you?"])
    grown = copy.deepcopy(model.model)
    grown.resize_token_embeddings(len(tokenizer))  # else the new ids are refused
    model = HFCausalLMAdapter(grown, tokenizer)
    inp = ChatInput(Chat().user("我爱北京, are you? 天"), model)
    assert inp.values == ["我", "爱", "北京", "are", "you?", "天"]
    for f in inp.features:
        assert model.tokenizer.decode(inp.encoded.input_ids[list(f.positions)]).strip() == f.label


def test_format_characters_never_form_a_token_feature(model):
    inp = ChatInput(Chat().user("hello\u200b\u200bworld"), model, text_unit="token")
    assert all(v.strip("\u200b") for v in inp.values)


def test_roles_accept_one_string_and_unknown_roles_name_the_error(model, chat):
    assert ChatInput(chat, model, roles="user").values == ChatInput(chat, model).values
    with pytest.raises(InvalidRoleError):
        ChatInput(chat, model, roles=("robot",))


def test_bad_groups_and_baselines_raise_named_errors(model, chat):
    with pytest.raises(InvalidGroupsError):
        ChatInput(chat, model, groups=[[0]] * 5)
    with pytest.raises(InvalidBaselineError):
        ChatInput(chat, model, text_baseline=10**6)
    with pytest.raises(InvalidBaselineError):
        ChatInput(chat, model, text_baseline=-1)
    with pytest.raises(InvalidBaselineError):
        ChatInput(chat, model, text_baseline="<|im_end|>")  # special: refused unless asked
    with pytest.raises(InvalidBaselineError):
        ChatInput(chat, model, text_baseline=1.5)  # type: ignore[arg-type]
    # a word rather than the token a byte-level vocabulary holds: the error names that token
    (space_the,) = model.tokenizer.encode(" the", add_special_tokens=False)
    token = model.tokenizer.convert_ids_to_tokens(space_the)
    with pytest.raises(InvalidBaselineError, match=f"spells ' the' as the token '{token}'"):
        ChatInput(chat, model, text_baseline="the")
    assert ChatInput(chat, model, text_baseline=token).replace_id == space_the
    for unit in (-1, "paragraph"):  # a text chat never read them: checked only at audio
        with pytest.raises(InvalidOptionError, match="audio"):
            ChatInput(chat, model, audio_unit=unit)


def test_a_plain_callable_is_not_a_model(chat):
    with pytest.raises(InvalidModelError):
        ChatInput(chat, lambda x: x)


def test_chat_template_kwargs_reach_the_template(model, chat):
    """Qwen3-style templates read apply_chat_template keywords (enable_thinking):
    the adapter had no way to pass them."""
    from captum.attr import FeatureAblation

    from captum_mllm import HFCausalLMAdapter, MultimodalLLMAttribution
    from captum_mllm.testing import CHATML_TEMPLATE

    tokenizer = copy.deepcopy(model.tokenizer)  # shared: the other tests keep its template
    tokenizer.chat_template = CHATML_TEMPLATE + (
        "{% if add_generation_prompt and enable_thinking is defined and not enable_thinking %}"
        "<think> </think>{% endif %}"
    )
    plain = HFCausalLMAdapter(model.model, tokenizer)
    quiet = HFCausalLMAdapter(
        model.model, tokenizer, chat_template_kwargs={"enable_thinking": False}
    )
    inp, quiet_inp = ChatInput(chat, plain), ChatInput(chat, quiet)
    assert quiet_inp.values == inp.values
    added = quiet.tokenizer.decode(quiet_inp.encoded.input_ids[len(inp.encoded) :])
    assert added == "<think> </think>"
    assert quiet.encodes_as(quiet) and not quiet.encodes_as(plain)  # one tokenizer, two prompts
    with pytest.raises(InvalidModelError):
        MultimodalLLMAttribution(FeatureAblation(quiet), quiet).attribute(inp, target="Hi")
    # The adapter's own arguments, or not a dict: a TypeError from transformers or jinja2
    for bad in ({"add_generation_prompt": False}, {"messages": []}, [("a", 1)]):
        with pytest.raises(InvalidOptionError, match="chat_template_kwargs"):
            HFCausalLMAdapter(model.model, tokenizer, chat_template_kwargs=bad)


def test_a_tokenizer_without_a_chat_template_is_named(chat):
    from captum_mllm import HFCausalLMAdapter
    from captum_mllm.testing import tiny_llama, tiny_tokenizer

    tokenizer = copy.deepcopy(tiny_tokenizer())  # shared: the other tests keep its template
    tokenizer.chat_template = None  # a base model's (transformers raised its own ValueError)
    with pytest.raises(ChatTemplateError, match="TextTemplateInput"):
        ChatInput(chat, HFCausalLMAdapter(tiny_llama(), tokenizer))
    # A template that refuses a system turn (as Gemma's does): jinja2's own error came through
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    refusing = HFCausalLMAdapter(tiny_llama(), tokenizer)
    with pytest.raises(ChatTemplateError, match="System role not supported.*first user turn"):
        ChatInput(Chat().system("Be brief.").user("Who are you?"), refusing)
    assert ChatInput(Chat().user("Who are you?"), refusing).values == ["Who", "are", "you"]
    # Another refusal is not told the system prompt's remedy
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.index0 and m['role'] == messages[loop.index0 - 1]"
        "['role'] %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
        "{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match="must alternate$"):
        ChatInput(Chat().user("Hi.").user("Who are you?"), refusing)


def test_final_assistant_turn_is_the_response_not_the_prompt(model, chat):
    inp = ChatInput(chat.assistant("I am a small model."), model)
    assert inp.response == "I am a small model."
    assert inp.values == ChatInput(chat, model).values
    # No generation prompt after the answer: the encoding is the prompt's.
    assert inp.encoded.input_ids.tolist() == model.encode(chat).input_ids.tolist()


def test_a_given_answer_follows_the_template_text_the_template_puts_before_it(model):
    """With thinking on, a Qwen3-style template renders a given answer after an
    empty <think> block; the answer was scored straight after the generation
    prompt instead, where the model never reads it."""
    from captum_mllm import HFCausalLMAdapter

    tokenizer = copy.deepcopy(model.tokenizer)  # shared: the other tests keep its template
    tokenizer.chat_template = THINKING_TEMPLATE
    thinking = HFCausalLMAdapter(model.model, tokenizer)
    quiet = HFCausalLMAdapter(
        model.model, tokenizer, chat_template_kwargs={"enable_thinking": False}
    )
    answered = [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "Paris."},
    ]
    chat = answered[:1]
    prompt = ChatInput(chat, thinking)  # an answer to generate: the generation prompt
    inp = ChatInput(answered, thinking)
    whole = tokenizer.apply_chat_template(answered, tokenize=False)
    lead = whole[: whole.rindex("Paris.")]
    assert lead.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    expected = tokenizer(lead, add_special_tokens=False)["input_ids"]
    assert inp.encoded.input_ids.tolist() == expected
    assert len(prompt.encoded) < len(inp.encoded)
    assert inp.values == prompt.values  # the block is template text, no feature
    # The answer's reasoning, which the template renders in the block: the model
    # reads the answer after it (as a message key it went unread, with a warning).
    reasoned = [answered[0], {**answered[1], "reasoning_content": "The capital."}]
    whole = tokenizer.apply_chat_template(reasoned, tokenize=False)
    assert "<think>\nThe capital.\n</think>\n\nParis." in whole
    lead = tokenizer(whole[: whole.rindex("Paris.")], add_special_tokens=False)["input_ids"]
    inp = ChatInput(reasoned, thinking)
    assert inp.encoded.input_ids.tolist() == lead and inp.response == "Paris."
    assert inp.values == prompt.values  # the reasoning is template text, no feature
    # Under its OpenAI-style name (vLLM's responses), which transformers reads as
    # reasoning_content: the builder refused it as no message key
    renamed = Chat().user("Who are you?").assistant("Paris.", reasoning="The capital.")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ChatInput(renamed, thinking).encoded.input_ids.tolist() == lead
    # Thinking off: the generation prompt holds the block already.
    assert ChatInput(answered, quiet).encoded.input_ids.tolist() == expected
    # The generation prompt, which the answer is generated after: for a template
    # that renders the answer without the generation prompt's text before it
    # (DeepSeek-R1's, whose generation prompt opens <think>), and for a space
    # alone before it (Llama 2's "[/INST] Paris"), which a tokenizer folds into
    # the answer's first token.
    llama2 = (
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}"
    )
    for template in (CHATML_TEMPLATE + "{% if add_generation_prompt %}<think>{% endif %}", llama2):
        tokenizer.chat_template = template
        other = HFCausalLMAdapter(model.model, tokenizer)
        assert (
            ChatInput(answered, other).encoded.input_ids.tolist()
            == other.encode(chat).input_ids.tolist()
        )
    refusing = "{% if messages[-1]['role'] == 'assistant' %}{{ raise_exception('no') }}{% endif %}"
    tokenizer.chat_template = refusing + CHATML_TEMPLATE  # refuses the chat with its answer
    other = HFCausalLMAdapter(model.model, tokenizer)
    assert (
        ChatInput(answered, other).encoded.input_ids.tolist()
        == other.encode(chat).input_ids.tolist()
    )
    tokenizer.chat_template = llama2.replace("{% else %} ", "{% else %}<think></think> ")
    spaced = HFCausalLMAdapter(model.model, tokenizer)  # the block, not the space after it
    assert tokenizer.decode(ChatInput(answered, spaced).encoded.input_ids).endswith(
        "[/INST]<think></think>"
    )


def test_a_given_answer_after_a_space_is_read_with_it(model):
    """Templates that write a space before the answer (Falcon's "Falcon: ",
    Llama 2's and Mistral's "[/INST] ") gave the answer's ids without it: a
    byte-level vocabulary then read "Paris" where the model reads " Paris",
    a token it never says there."""
    from captum_mllm import HFCausalLMAdapter, MultimodalLLMAttribution

    tokenizer = copy.deepcopy(model.tokenizer)  # shared: the other tests keep its template
    tokenizer.chat_template = FALCON_TEMPLATE
    falcon = HFCausalLMAdapter(model.model, tokenizer)
    answered = [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "Paris."},
    ]
    inp = ChatInput(answered, falcon)
    prompt = inp.encoded.input_ids.tolist()
    assert prompt == falcon.encode(answered[:1]).input_ids.tolist()  # the generation prompt
    whole = tokenizer(tokenizer.apply_chat_template(answered, tokenize=False))["input_ids"]
    assert whole[: len(prompt)] == prompt
    read = whole[len(prompt) :]  # the answer as the template and tokenizer give it
    assert read != tokenizer("Paris.", add_special_tokens=False)["input_ids"]  # alone: no space
    attr = MultimodalLLMAttribution(FeatureAblation(falcon), falcon)
    res = attr.attribute(inp)
    assert res.target_ids.tolist() == read
    again = attr.attribute(ChatInput(answered[:1], falcon), target="Paris.")  # target= alike
    assert again.target_ids.tolist() == read
    assert torch.equal(again.seq_attr, res.seq_attr)
    same = attr.attribute(inp, target=torch.tensor(read))  # its ids name the same answer
    assert torch.equal(same.seq_attr, res.seq_attr)
    # A line break before the answer that the generation prompt lacks (Zephyr's
    # "<|assistant|>" against "<|assistant|>\n..."): template text, read before it.
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
    )
    zephyr = HFCausalLMAdapter(model.model, tokenizer)
    inp = ChatInput(answered, zephyr)
    whole = tokenizer.apply_chat_template(answered, tokenize=False)
    lead = tokenizer(whole[: whole.rindex("Paris.")], add_special_tokens=False)["input_ids"]
    assert inp.encoded.input_ids.tolist() == lead
    res = MultimodalLLMAttribution(FeatureAblation(zephyr), zephyr).attribute(inp)
    assert res.target_ids.tolist() == tokenizer("Paris.", add_special_tokens=False)["input_ids"]


def test_a_template_that_moves_the_system_prompt_keeps_each_word_in_its_turn(model):
    """Mistral's template (v0.3) puts the system prompt in the last user turn:
    a multi-turn chat with a system prompt raised "changed the text of turn 0"."""
    from captum_mllm import HFCausalLMAdapter

    tokenizer = copy.deepcopy(model.tokenizer)  # shared: the other tests keep its template
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set messages = messages[1:] %}{% endif %}{% for m in messages %}"
        "{% if m['role'] == 'user' %}[INST] {% if loop.last and system is defined %}"
        "{{ system }}\n\n{% endif %}{{ m['content'] }}[/INST]"
        "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}"
    )
    mistral = HFCausalLMAdapter(model.model, tokenizer)
    chat = Chat().system("Be brief.").user("Capital of France?").assistant("Paris.")
    inp = ChatInput(chat.user("And of Spain?"), mistral, roles=("system", "user"))
    rendered = tokenizer.decode(inp.encoded.input_ids)
    assert (
        rendered
        == "[INST] Capital of France?[/INST] Paris.</s>[INST] Be brief.\n\nAnd of Spain?[/INST]"
    )
    words = {(f.label, f.turn) for f in inp.features}
    assert words == {("Be", 0), ("brief", 0), ("Capital", 1), ("of", 1), ("France", 1),
                     ("And", 3), ("of", 3), ("Spain", 3)}  # fmt: skip
    for f in inp.features:  # each feature's positions spell its word, in its turn
        assert tokenizer.decode(inp.encoded.input_ids[list(f.positions)]).strip() == f.label
        assert {int(inp.encoded.turn[p]) for p in f.positions} == {f.turn}
    # A template that repeats a content cannot be explained by position
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match="repeats or drops"):
        ChatInput(Chat().user("Hi there"), HFCausalLMAdapter(model.model, tokenizer))


def test_an_earlier_answer_whose_reasoning_the_template_drops_is_read_as_rendered(model):
    """Qwen3's template drops an earlier answer's <think> block: a multi-turn
    chat whose history holds a generated answer raised "changed the text of
    turn 1", whatever its features. What the model reads is explained."""
    from captum_mllm import HFCausalLMAdapter

    tokenizer = copy.deepcopy(model.tokenizer)  # shared: the other tests keep its template
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and '</think>' in m.content %}"
        "{{ m.content.split('</think>')[-1].lstrip('\\n') }}{% else %}{{ m.content }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    qwen3 = HFCausalLMAdapter(model.model, tokenizer)
    said = "<think>\nThe user asks about France.\n</think>\n\nParis is."
    chat = Chat().user("Capital of France?").assistant(said).user("And of Spain?")
    with pytest.warns(UserWarning, match="rewrites turn 1: '<think>.*' is read as 'Paris is.'"):
        inp = ChatInput(chat, qwen3, roles=("user", "assistant"))
    texts = ["Capital of France?", said, "And of Spain?"]
    messages = [{"role": t.role, "content": c} for t, c in zip(chat, texts, strict=True)]
    want = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert inp.encoded.input_ids.tolist() == list(want["input_ids"])
    words = [(f.label, f.turn) for f in inp.features]
    assert words == [("Capital", 0), ("of", 0), ("France", 0), ("Paris", 1), ("is", 1),
                     ("And", 2), ("of", 2), ("Spain", 2)]  # fmt: skip
    for f in inp.features:  # each feature's positions spell its word, in its turn
        assert tokenizer.decode(inp.encoded.input_ids[list(f.positions)]).strip() == f.label
        assert {int(inp.encoded.turn[p]) for p in f.positions} == {f.turn}


def test_a_tool_output_the_template_writes_as_json_keeps_its_words(model):
    """Llama 3.1-3.3's templates write a tool output with ``| tojson`` (a string
    is iterable in Jinja). An output with a line break or quotes was read as a
    rewritten turn, with a warning, and its words were cut at the escapes:
    "\\nWindy" gave the feature "nWindy". Its words are now the output's own,
    each holding the tokens of its escapes."""
    import json

    from captum_mllm import HFCausalLMAdapter
    from captum_mllm.testing import check_adapter

    tokenizer = copy.deepcopy(model.tokenizer)  # shared: the other tests keep its template
    tokenizer.chat_template = (  # Llama 3.1's tool turn, in ChatML
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'tool' %}"
        "{% if m.content is mapping or m.content is iterable %}{{ m.content | tojson }}"
        "{% else %}{{ m.content }}{% endif %}{% else %}{{ m.content }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    llama = HFCausalLMAdapter(model.model, tokenizer)
    said = 'Sunny, 20 C.\nWindy "later" today'
    chat = Chat().user("Weather in Paris?").tool(["Rain\tsoon.", said]).user("Umbrella?")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is rewritten
        inp = ChatInput(chat, llama, roles=("user", "tool"), text_unit="word")
    messages = [{"role": t.role, "content": "\n".join(p.text for p in t.parts)} for t in chat]
    want = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert inp.encoded.input_ids.tolist() == list(want["input_ids"])
    words = [(f.label, f.turn) for f in inp.features]
    assert words == [("Weather", 0), ("in", 0), ("Paris", 0), ("Rain", 1), ("soon", 1),
                     ("Sunny", 1), ("20", 1), ("C", 1), ("Windy", 1), ("later", 1),
                     ("today", 1), ("Umbrella", 2)]  # fmt: skip
    assert inp.encoded.part_texts[(1, 1)] == said
    for f in inp.features:  # each feature's positions spell its word, escapes and all
        read = tokenizer.decode(inp.encoded.input_ids[list(f.positions)])
        assert json.loads(f'"{read.strip()}"').strip() == f.label
    sentences = ChatInput(chat, llama, roles=("tool",), text_unit="sentence")
    assert [f.label for f in sentences.features] == ["Rain\tsoon.", "Sunny, 20 C.",
                                                     'Windy "later" today']  # fmt: skip
    check_adapter(llama, chat)


def test_a_template_that_refuses_a_system_prompt_alone_is_read(model):
    """Llama 3.1-3.3's templates, given tools, write them into the first user
    turn and raise on a chat without one. Turn spans were found by rendering
    each prefix of the chat, so every chat with tools and a system prompt raised
    "Cannot put tools in the first user message". Such a template gets turns of
    their contents alone, as one that does not render prefixes as prefixes."""
    from captum_mllm import HFCausalLMAdapter

    tokenizer = copy.deepcopy(model.tokenizer)  # shared: the other tests keep its template
    tokenizer.chat_template = (  # Llama 3.1's system and tools handling, in ChatML
        "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
        "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
        "<|im_start|>system\n{{ system }}<|im_end|>\n"
        "{%- if tools is defined and tools is not none %}{%- if messages | length != 0 %}"
        "{%- set first = messages[0]['content'] %}{%- set messages = messages[1:] %}{%- else %}"
        "{{- raise_exception('Cannot put tools in the first user message when there is no "
        "first user message!') }}{%- endif %}<|im_start|>user\nUse {{ tools | tojson }}\n"
        "{{ first }}<|im_end|>\n{%- endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    llama = HFCausalLMAdapter(model.model, tokenizer, chat_template_kwargs={"tools": tools})
    chat = Chat().system("Be brief.").user("Weather in Paris?")
    want = tokenizer.apply_chat_template(
        [{"role": t.role, "content": t.parts[0].text} for t in chat],
        tools=tools,
        add_generation_prompt=True,
    )
    inp = ChatInput(chat, llama, roles=("system", "user"))
    assert inp.encoded.input_ids.tolist() == list(want["input_ids"])
    assert [(f.label, f.turn) for f in inp.features] == [
        ("Be", 0), ("brief", 0), ("Weather", 1), ("in", 1), ("Paris", 1)
    ]  # fmt: skip
    turns = ChatInput(chat, llama, roles=("system", "user"), text_unit="turn")
    for f, text in zip(turns.features, ["Be brief.", "Weather in Paris?"], strict=True):
        assert tokenizer.decode(turns.encoded.input_ids[list(f.positions)]) == text


def test_characters_a_vocabulary_lacks_stay_in_their_words():
    """A tokenizer without byte fallback reads a character its vocabulary lacks
    as <unk>, a special token, and special positions were left out of every part:
    "it's" lost its apostrophe, and a turn of such characters alone had no position
    (check_adapter: "has no position"). <unk> is the content it stands for."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from captum_mllm import HFCausalLMAdapter
    from captum_mllm.testing import CHATML_TEMPLATE, check_adapter

    words = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "dog", "it", "s"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, pad_token_id=2, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = HFCausalLMAdapter(LlamaForCausalLM(config).eval(), tokenizer)
    chat = Chat().user("dog it's").user("北京")
    inp = ChatInput(chat, model)
    unk = tokenizer.unk_token_id
    held = [(f.label, inp.encoded.input_ids[list(f.positions)].tolist()) for f in inp.features]
    assert held == [("dog", [5]), ("it's", [6, unk, 7]), ("北京", [unk])]
    check_adapter(model, chat)


def test_a_template_that_reads_text_parts_only_gets_them(model):
    """SmolVLM's and Llama 3.2 Vision's templates read a message's text from a
    list of parts and render a string content to nothing: every chat raised
    "repeats or drops message contents". A string content now goes as one part."""
    from captum_mllm import HFCausalLMAdapter, MultimodalLLMAttribution
    from captum_mllm.testing import check_adapter

    tokenizer = copy.deepcopy(model.tokenizer)  # shared: the other tests keep its template
    tokenizer.chat_template = (  # SmolVLM's, shortened
        "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}: "
        "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
        "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    )
    vlm = HFCausalLMAdapter(model.model, tokenizer)
    chat = Chat().system("Be brief.").user("Who are you, my friend?")
    inp = ChatInput(chat, vlm, roles=("system", "user"))
    messages = [
        {"role": t.role, "content": [{"type": "text", "text": t.parts[0].text}]} for t in chat
    ]
    want = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert inp.encoded.input_ids.tolist() == list(want["input_ids"])
    assert inp.values == ["Be", "brief", "Who", "are", "you", "my", "friend"]
    check_adapter(vlm, chat)
    # A given answer is read as the template renders it after the prompt
    answered = chat.assistant("I am a bot.")
    res = MultimodalLLMAttribution(FeatureAblation(vlm), vlm).attribute(ChatInput(answered, vlm))
    chatml = MultimodalLLMAttribution(FeatureAblation(model), model)
    assert res.output_tokens == chatml.attribute(ChatInput(answered, model)).output_tokens


def test_named_chat_templates_give_the_default_or_the_tool_use_one(model, chat):
    """A tokenizer with named templates (Hermes', Command R's) keeps them in a
    dict: the default renders a chat, tool_use one with tools, as transformers'
    apply_chat_template chooses."""
    from captum_mllm import HFCausalLMAdapter

    tokenizer = copy.deepcopy(model.tokenizer)  # shared: the other tests keep its template
    tokenizer.chat_template = {
        "default": CHATML_TEMPLATE,
        "tool_use": "{{ tools | length }} tools\n" + CHATML_TEMPLATE,
    }
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    for kwargs in ({}, {"tools": tools}):
        adapter = HFCausalLMAdapter(model.model, tokenizer, chat_template_kwargs=kwargs)
        inp = ChatInput(chat, adapter, roles=("system", "user"))
        messages = [{"role": t.role, "content": t.parts[0].text} for t in chat]
        want = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        assert inp.encoded.input_ids.tolist() == list(want["input_ids"])
        assert inp.values[-5:] == ["Who", "are", "you", "my", "friend"]


def test_tool_outputs_are_turns_and_tool_calls_reach_the_template(model):
    """An agent's chat: the model called a tool and read its output. The tool
    role raised, and tool_calls vanished (the template rendered no call)."""
    from captum_mllm import HFCausalLMAdapter, MultimodalLLMAttribution
    from captum_mllm.methods import ExactShapleyValues

    tokenizer = copy.deepcopy(model.tokenizer)  # shared: the other tests keep its template
    tokenizer.chat_template = TOOL_TEMPLATE
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    agent = HFCausalLMAdapter(model.model, tokenizer, chat_template_kwargs={"tools": tools})
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "Sunny, warm.", "tool_call_id": "0"},
        {"role": "tool", "content": "Rain later.", "tool_call_id": "1"},
    ]
    built = (
        Chat().system("Be brief.").user("Weather in Paris?").assistant(tool_calls=[call])
        .tool("Sunny, warm.", tool_call_id="0").tool("Rain later.", tool_call_id="1")
    )  # fmt: skip
    expected = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}' in expected
    for chat in (Chat.from_messages(messages), built):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the template reads the calls: nothing to say
            inp = ChatInput(chat, agent, roles=("user", "tool"))
        assert inp.encoded.input_ids.tolist() == tokenizer(expected)["input_ids"]
        words = [(f.label, f.turn) for f in inp.features]
        assert words == [("Weather", 1), ("in", 1), ("Paris", 1), ("Sunny", 3), ("warm", 3),
                         ("Rain", 4), ("later", 4)]  # fmt: skip
        for f in inp.features:  # each feature's positions spell its word, in its turn
            assert tokenizer.decode(inp.encoded.input_ids[list(f.positions)]).strip() == f.label
            assert {int(inp.encoded.turn[p]) for p in f.positions} == {f.turn}
    # OpenAI's format holds the arguments as a JSON string, which `| tojson` wrote
    # as one quoted string; vLLM parses it before the template, and so does Chat
    sent = {"type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}
    request = [*messages[:2], {**messages[2], "tool_calls": [sent]}, *messages[3:]]
    read = ChatInput(Chat.from_messages(request), agent, roles=("user", "tool"))
    assert read.encoded.input_ids.tolist() == tokenizer(expected)["input_ids"]
    assert sent["function"]["arguments"] == '{"city":"Paris"}'  # the caller's dict is kept
    with pytest.warns(UserWarning, match="not a JSON object"):  # kept as given
        odd = {"type": "function", "function": {"name": "weather", "arguments": "city=Paris"}}
        assert Chat().assistant(tool_calls=[odd]).to_messages()[0]["tool_calls"] == [odd]
    res = MultimodalLLMAttribution(ExactShapleyValues(agent), agent).attribute(
        inp, target="Take an umbrella."
    )
    assert res.roles == ["system", "user", "assistant", "tool", "tool"]
    # The call is shown where the chat is (plots, reports), as text no feature holds
    assert res.segments[2] == {"role": "assistant", "parts": [
        {"text": [['weather({"city": "Paris"})', -1]]}]}  # fmt: skip
    assert list(res.by_role()["role"]) == ["tool", "user"]
    # A template without a tool format drops the call: the model never reads it
    with pytest.warns(UserWarning, match=r"none of \['tool_call_id', 'tool_calls'\]"):
        ChatInput(built, model, roles=("user", "tool"))
    plain = HFCausalLMAdapter(model.model, model.tokenizer, chat_template_kwargs={"tools": tools})
    with pytest.warns(UserWarning, match=r"none of \['tool_call_id', 'tool_calls', 'tools \("):
        ChatInput(built, plain, roles=("user", "tool"))
    with pytest.warns(UserWarning, match=r"none of \['reasoning_content'\]"):
        ChatInput(Chat().user("Hi").assistant("Paris.", reasoning_content="It is."), model)
    # Another call's arguments are another chat: a store of this one is not read for it
    from captum_mllm.fingerprint import chat_digest

    other = {**call, "function": {**call["function"], "arguments": {"city": "Rome"}}}
    assert chat_digest(built) != chat_digest(Chat.from_messages([*messages[:2],
        {**messages[2], "tool_calls": [other]}, *messages[3:]]))  # fmt: skip
    assert chat_digest(Chat().user("Hi")) == chat_digest(Chat.from_messages(
        [{"role": "user", "content": "Hi"}]))  # fmt: skip


def test_a_processor_is_read_through_its_tokenizer_and_its_chat_template(model):
    """A multimodal checkpoint's AutoProcessor holds the tokenizer, and the
    chat template the checkpoint ships; given one, the adapter asked it for a
    fast tokenizer and refused."""
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

    from captum_mllm import HFCausalLMAdapter

    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "
    processor = Qwen2AudioProcessor(
        feature_extractor=WhisperFeatureExtractor(), tokenizer=model.tokenizer,
        chat_template=template,
    )  # fmt: skip
    own = model.tokenizer.chat_template
    inp = ChatInput(Chat().user("Who are you?"), HFCausalLMAdapter(model.model, processor))
    assert model.tokenizer.decode(inp.encoded.input_ids) == "[user] Who are you?\n[assistant] "
    assert inp.values == ["Who", "are", "you"]
    assert model.tokenizer.chat_template == own  # the shared tokenizer keeps its own


def test_a_template_that_writes_todays_date_warns_until_it_is_pinned(model, chat):
    """Llama 3.1-3.3's templates write the day's date into the system turn:
    the same chat gave other values, and its store was refused, the next day."""
    import warnings

    from captum_mllm import HFCausalLMAdapter

    tokenizer = copy.deepcopy(model.tokenizer)  # shared: the other tests keep its template
    tokenizer.chat_template = (
        "{% if date_string is not defined %}{% set date_string = strftime_now('%d %b %Y') %}"
        "{% endif %}<|im_start|>system\nToday Date: {{ date_string }}<|im_end|>\n"
    ) + CHATML_TEMPLATE
    with pytest.warns(UserWarning, match="today's date") as caught:
        ChatInput(chat, HFCausalLMAdapter(model.model, tokenizer))
    assert caught[0].filename == __file__  # at the user's line
    pinned = HFCausalLMAdapter(
        model.model, tokenizer, chat_template_kwargs={"date_string": "1 Jan"}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inp = ChatInput(chat, pinned)
    assert "Today Date: 1 Jan" in tokenizer.decode(inp.encoded.input_ids)
    # gpt-oss's template writes the date without reading a date_string: not pinned by one
    tokenizer.chat_template = "Current date: {{ strftime_now('%Y-%m-%d') }}\n" + CHATML_TEMPLATE
    unread = HFCausalLMAdapter(
        model.model, tokenizer, chat_template_kwargs={"date_string": "1 Jan"}
    )
    with pytest.warns(UserWarning, match="write a date into tokenizer.chat_template"):
        ChatInput(chat, unread)


@pytest.mark.parametrize(
    "text, sentences",
    [
        ("Hi there. How are you? Fine!", ["Hi there.", "How are you?", "Fine!"]),
        ("It costs 3.5 dollars. Cheap", ["It costs 3.5 dollars.", "Cheap"]),  # no space: whole
        ("Line one\nLine two", ["Line one", "Line two"]),
        ("我爱猫。你呢？", ["我爱猫。", "你呢？"]),  # CJK: no space after the stop
        ("Wait... what?! Ok", ["Wait... what?!", "Ok"]),  # full stops before a lowercase letter
        ("  I saw e.g. this one. ", ["I saw e.g. this one."]),  # end none (Unicode's SB8)
        ("See p. (5) on it. Then", ["See p. (5) on it.", "Then"]),  # the next letter's case
        # a title before a name, and e.g., end none (CLDR's exceptions); they ended one
        ("Dr. Smith is in. Ask him!", ["Dr. Smith is in.", "Ask him!"]),
        ("Ask Mrs. Brown and Prof. X. Lee.", ["Ask Mrs. Brown and Prof. X.", "Lee."]),
        ("Cities, e.g. Paris. More", ["Cities, e.g. Paris.", "More"]),
        ("It was Dr.\nThen", ["It was Dr.", "Then"]),  # a line break ends it still
        ("He works at Acme Inc. The end", ["He works at Acme Inc.", "The end"]),  # a rule
        ("Visit Dr.Who. Now", ["Visit Dr.Who.", "Now"]),
        # a list item's number begins its sentence (each was a sentence of its own)
        (
            "Steps:\n1. Buy milk.\n2. Walk\nIV. End",
            ["Steps:", "1. Buy milk.", "2. Walk", "IV. End"],
        ),
        ("b. Go. Then 2. Run", ["b. Go.", "Then 2.", "Run"]),  # not at a line's start: ends one
        ("1.\n2. x", ["1.", "2. x"]),  # alone on its line: a sentence still
        ("Yes! maybe… so? no", ["Yes!", "maybe…", "so?", "no"]),  # ! ? … end one whatever follows
        ("what is it. and this", ["what is it.", "and this"]),  # uncased (a transcript): no SB8
        ("?!", ["?!"]),
        ("", []),
        # Unicode's Sentence_Terminal: Hindi's danda, Arabic's question mark and full stop
        ("नमस्ते दुनिया। क्या हाल है?", ["नमस्ते दुनिया।", "क्या हाल है?"]),
        ("هل قرأت الكتاب؟ نعم۔ جيد", ["هل قرأت الكتاب؟", "نعم۔", "جيد"]),
        ("Բարեւ։ Ինչպես ես", ["Բարեւ։", "Ինչպես ես"]),
    ],
)
def test_sentence_spans(text, sentences):
    from captum_mllm.words import sentence_spans

    assert [text[a:b] for a, b in sentence_spans(text)] == sentences


@pytest.mark.parametrize(
    "text, paragraphs",
    [
        ("One. Two\nthree.\n\nFour five.", ["One. Two\nthree.", "Four five."]),  # a line break
        ("A\n \t\nB\r\n\r\nC\r\nD", ["A", "B", "C\r\nD"]),  # a blank line may hold spaces
        ("A\u2029B\n\n\n\n", ["A", "B"]),  # Unicode's paragraph separator
        ("  \n\n ", []),
    ],
)
def test_paragraph_spans(text, paragraphs):
    from captum_mllm.words import paragraph_spans

    assert [text[a:b] for a, b in paragraph_spans(text)] == paragraphs


def test_paragraphs_are_features_in_whole_tokens(model):
    """text_unit="paragraph": each retrieved passage of a turn is one feature,
    the positions of its sentences together."""
    passages = "The sky is blue. It is day.\nBirds fly.\n\nGrass is green.\n\nWhat is blue?"
    inp = ChatInput(Chat().system("Use the passages.").user(passages), model, text_unit="paragraph")
    assert inp.values == [
        "The sky is blue. It is day.\nBirds fly.",
        "Grass is green.",
        "What is blue?",
    ]
    for f in inp.features:
        assert model.tokenizer.decode(inp.encoded.input_ids[list(f.positions)]).strip() == f.label
    sentences = ChatInput(
        Chat().system("Use the passages.").user(passages), model, text_unit="sentence"
    )
    first = [p for f in sentences.features[:3] for p in f.positions]
    assert sorted(first) == sorted(inp.features[0].positions)


def test_sentences_are_features_in_whole_tokens(model):
    """text_unit="sentence": a sentence's words and punctuation, the same
    positions and values as its words grouped (punctuation kept)."""
    from captum.attr import ShapleyValues

    from captum_mllm import MultimodalLLMAttribution

    chat = Chat().system("Be brief. Be kind.").user("Who are you? I am your friend. Tell me!")
    inp = ChatInput(chat, model, roles=("system", "user"), text_unit="sentence")
    assert inp.values == ["Be brief.", "Be kind.", "Who are you?", "I am your friend.", "Tell me!"]
    for f in inp.features:
        assert model.tokenizer.decode(inp.encoded.input_ids[list(f.positions)]).strip() == f.label
    words = ChatInput(chat, model, roles=("system", "user"), skip=("special",))
    ends = [i for i, w in enumerate(words.values) if w in (".", "?", "!")]
    groups = [sum(e < i for e in ends) for i in range(len(words.values))]
    grouped = ChatInput(chat, model, roles=("system", "user"), skip=("special",), groups=groups)
    assert [f.positions for f in grouped.features] == [f.positions for f in inp.features]
    attr = MultimodalLLMAttribution(ShapleyValues(model), model)
    torch.testing.assert_close(
        attr.attribute(inp, target="I am.").seq_attr,
        attr.attribute(grouped, target="I am.").seq_attr,
    )
    assert inp.feature_tree() == [[0, 1], [2, 3, 4]]  # turn > sentence


def test_empty_system_turn_is_accepted(model):
    inp = ChatInput(Chat().system("").user("Who are you?"), model)
    assert inp.values == ["Who", "are", "you"]


@pytest.mark.parametrize("unit", ["word", "sentence"])
def test_each_parts_words_are_found_once(model, monkeypatch, unit):
    """Every text part's words were found again for each turn holding features:
    a 100-turn chat took 2.8 s to encode on SmolLM2, 0.2 s now."""
    import captum_mllm.chat_features as features  # where ChatInput finds its words

    name = "word_spans" if unit == "word" else "sentence_spans"
    found = getattr(features, name)
    calls = []
    monkeypatch.setattr(features, name, lambda text: calls.append(text) or found(text))
    chat = Chat().system("Be brief.")
    for i in range(12):
        chat = chat.user(f"Question {i}: what is {i} plus {i}?").assistant(f"It is {2 * i}.")
    inp = ChatInput(chat.user("Thanks."), model, roles=("user", "assistant"), text_unit=unit)
    assert len(calls) == 25  # once for each feature turn's part
    assert inp.features[-1].label == ("Thanks" if unit == "word" else "Thanks.")
