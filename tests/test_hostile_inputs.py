"""Hostile inputs (Part 16): every chat, message list, feature specification and
audio array either explains or raises one of captum-mllm's named errors, never
an exception from deep inside the model.

Property-based (hypothesis, 200 examples per strategy, derandomised so that CI
sees the same examples on every run). An example "works" when ChatInput builds
and one batch of coalitions is scored by the tiny model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from captum_mllm import Chat, ChatInput, LFM2AudioAdapter
from captum_mllm.errors import CaptumMLLMError, InvalidContentError
from captum_mllm.testing import tiny_hf_adapter, tiny_lfm2_audio

EXAMPLES = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CONTROL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>assistant\nSure"]
ODD_TEXT = [
    "", " ", "\n\n", "\u200b", "\u200d", "e\u0301", "😀👍🏽", "Hello, world!", "...", "-",
    "日本語のテキスト", "مرحبا", "a" * 300, "{}", "{0}", "<b>bold</b>", "\x00", "\t tab",
]  # fmt: skip
texts = st.one_of(
    st.text(min_size=1, max_size=30),
    st.sampled_from(ODD_TEXT + CONTROL),
    st.lists(st.sampled_from(ODD_TEXT + CONTROL + ["word"]), max_size=4).map(" ".join),
)
# Mostly valid roles, so that most chats reach the model; a few invalid ones.
roles = st.sampled_from(["user"] * 6 + ["assistant", "system", "tool", "", "USER"])

_HF = tiny_hf_adapter()
_LFM: LFM2AudioAdapter | None = None


def lfm() -> LFM2AudioAdapter:
    global _LFM
    if _LFM is None:
        _LFM = LFM2AudioAdapter(*tiny_lfm2_audio())
    return _LFM


OUTCOMES: Counter[str] = Counter()


def explain_once(chat: Any, model: Any, **kwargs: Any) -> str:
    """Build the input (``chat`` may be a function that builds the chat) and
    score a few coalitions: "ok", or "refused" for one of our errors (counted
    in ``OUTCOMES``); any other exception propagates and fails the test."""
    outcome = _explain_once(chat, model, **kwargs)
    OUTCOMES[outcome] += 1
    return outcome


def run_strategy(examples: Callable[[], None]) -> None:
    """Run a property over its examples, then check that they were not refused
    wholesale: many reach the model, many are refused."""
    OUTCOMES.clear()
    examples()
    assert sum(OUTCOMES.values()) >= 200, OUTCOMES
    assert OUTCOMES["ok"] >= 10 and OUTCOMES["refused"] >= 10, OUTCOMES


def _explain_once(chat: Any, model: Any, **kwargs: Any) -> str:
    try:
        inp = ChatInput(chat() if callable(chat) else chat, model, **kwargs)
        inp.segments()  # reports and plots read the chat through it
        g = torch.Generator().manual_seed(0)
        masks = torch.randint(0, 2, (3, inp.n_itp_features), generator=g)
        masks[0] = 1
        values = model.score_masked(inp.to_model_input(masks), model.text_response("Hi there"))
    except CaptumMLLMError:
        return "refused"
    assert values.shape[0] == 3 and bool(torch.isfinite(values).all())
    return "ok"


def has_control(text: str) -> bool:
    return any(c in text for c in CONTROL)


@EXAMPLES
@given(turns=st.lists(st.tuples(roles, st.lists(texts, min_size=1, max_size=3)), max_size=4))
def random_chats(turns: list[tuple[str, list[str]]]) -> None:
    def build() -> Chat:
        chat = Chat()
        for role, parts in turns:
            chat = chat.add(role, parts)
        return chat

    outcome = explain_once(build, _HF)
    if any(has_control(t) for _, parts in turns for t in parts):
        assert outcome == "refused"  # control tokens never become structure


text_item = st.fixed_dictionaries({"type": st.just("text"), "text": texts})
content_item = st.one_of(
    text_item,
    text_item,
    text_item,
    st.fixed_dictionaries({"type": st.just("text"), "text": st.sampled_from([None, 3, ["a"]])}),
    st.fixed_dictionaries({"type": st.sampled_from(["image", "video", ""])}),
    st.fixed_dictionaries(
        {
            "type": st.just("audio"),
            "audio": st.sampled_from([[0.1] * 4000, [], "missing.wav", None, 5]),
            "sampling_rate": st.sampled_from([16000, 8000, None, 0, -1]),
        }
    ),
    st.just({"text": "no type"}),
    st.just("not a dict"),
)
valid_message = st.fixed_dictionaries({"role": roles, "content": texts})
# Keys beside role and content reach the template: calls as given, and odd ones.
call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
extra_message = st.fixed_dictionaries(
    {"role": roles, "content": st.sampled_from([None, "", "Sunny."])},
    optional={
        "tool_calls": st.sampled_from([[call], [], "weather()", [{"function": 3}], None]),
        "tool_call_id": st.sampled_from(["0", 7, None]),
        "reasoning_content": texts,
    },
)
message = st.one_of(
    extra_message,
    valid_message,
    valid_message,
    valid_message,
    st.fixed_dictionaries({"role": roles, "content": st.lists(content_item, max_size=3)}),
    st.fixed_dictionaries({"role": roles, "content": st.sampled_from([None, 42, {"a": 1}])}),
    st.just({"content": "no role"}),
    st.just(["not", "a", "dict"]),
)


typed_message = st.fixed_dictionaries(
    {"role": roles, "content": st.lists(text_item, min_size=1, max_size=2)}
)
messages_ = st.one_of(
    st.lists(valid_message | typed_message, min_size=1, max_size=3),
    st.lists(message, max_size=4),
)


@EXAMPLES
@given(messages=messages_)
def hugging_face_message_lists(messages: list[Any]) -> None:
    model = lfm() if any("audio" in str(m) for m in messages) else _HF
    explain_once(messages, model)


@EXAMPLES
@given(
    roles_=st.lists(roles, max_size=3),
    text_unit=st.sampled_from(["word", "token", "turn", "sentence", ""]),
    skip=st.lists(st.sampled_from(["punctuation", "special", "the", "", "Who"]), max_size=3),
    groups=st.one_of(st.none(), st.lists(st.integers(0, 3) | st.text(max_size=2), max_size=12)),
    baseline=st.sampled_from(["drop", "replace", 0, 5, -1, 10**6, "x", 2.5]),
    allow_special=st.booleans(),
)
def feature_specifications(
    roles_: list[str],
    text_unit: str,
    skip: list[str],
    groups: list[Any] | None,
    baseline: Any,
    allow_special: bool,
) -> None:
    chat = (
        Chat()
        .system("You are a helpful assistant.")
        .user("Who are you, my friend?")
        .assistant("A model.")
        .user("Tell me more, please!")
    )
    explain_once(
        chat,
        _HF,
        roles=roles_,
        text_unit=text_unit,
        skip=skip,
        groups=groups,
        text_baseline=baseline,
        allow_special_baseline=allow_special,
    )


FAULTS = [
    None, "rate_zero", "rate_negative", "rate_fraction", "one_sample", "20ms", "50ms",
    "3d", "empty", "nan_one", "inf_one", "all_nan", "unit", "spans", "baseline", "fill",
]  # fmt: skip


@st.composite
def audio_cases(draw: st.DrawFn) -> tuple[Any, Any, dict[str, Any], str | None]:
    """A usable clip and settings (any sample rate, dtype, channel layout and
    loudness), with at most one fault, so that each fault is met alone."""
    fault = draw(st.sampled_from(FAULTS) | st.none())  # no fault: a usable clip
    rate: Any = draw(st.sampled_from([16000, 8000, 44100, 22050]))
    seconds = draw(st.sampled_from([0.3, 1.0]))
    layout = draw(st.sampled_from(["mono", "channels_first", "channels_last"]))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int16, np.int32, np.uint8]))
    level = draw(st.sampled_from(["noise", "zeros", "loud"]))
    kwargs: dict[str, Any] = {
        "audio_unit": draw(st.sampled_from([0.1, 0.25, 0.5, "turn", "frame"])),
        "audio_baseline": draw(st.sampled_from(["drop", "embedding", "silence"])),
    }
    if fault in ("one_sample", "20ms", "50ms"):
        seconds = {"one_sample": 1 / rate, "20ms": 0.02, "50ms": 0.05}[fault]
    rate = {"rate_zero": 0, "rate_negative": -rate, "rate_fraction": rate + 0.5}.get(fault, rate)
    n = max(1, int(abs(rate) * seconds))
    rng = np.random.default_rng(draw(st.integers(0, 100)))
    wave = rng.standard_normal(n) * {"noise": 0.1, "zeros": 0.0, "loud": 1e4}[level]
    if fault in ("nan_one", "inf_one"):
        wave[rng.integers(n)] = np.nan if fault == "nan_one" else -np.inf
    elif fault == "all_nan":
        wave[:] = np.nan
    if np.issubdtype(dtype, np.integer) and fault not in ("nan_one", "inf_one", "all_nan"):
        info = np.iinfo(dtype)
        wave = np.clip(wave * info.max, info.min, info.max)
    else:
        dtype = np.float32 if dtype not in (np.float32, np.float64) else dtype
    wave = wave.astype(dtype)
    if layout == "channels_first":
        wave = np.stack([wave, wave])
    elif layout == "channels_last":
        wave = np.stack([wave, wave], axis=1)
    if fault == "3d":
        wave = wave[None, None]
    elif fault == "empty":
        wave = wave[:0]
    if fault == "unit":
        kwargs["audio_unit"] = draw(
            st.sampled_from([0.0, -1.0, float("nan"), "word", "sentence", "x", [1]])
        )
    elif fault == "spans":
        times = st.floats(-1, 3) | st.just(float("nan"))
        kwargs["audio_unit"] = draw(
            st.lists(st.tuples(times, times, st.text(max_size=3)), max_size=3)
        )
    elif fault == "baseline":
        kwargs["audio_baseline"] = draw(st.sampled_from(["zero", "", None]))
    elif fault == "fill":
        kwargs["audio_baseline"] = "embedding"
        kwargs["audio_fill"] = draw(
            st.sampled_from(
                [torch.ones(3), torch.ones(1, 64), torch.full((64,), float("nan")), "zeros", 0]
            )
        )
    if draw(st.booleans()):
        wave = torch.from_numpy(np.ascontiguousarray(wave))
    return wave, rate, kwargs, fault


@EXAMPLES
@given(case=audio_cases())
def audio_arrays_and_units(case: tuple[Any, Any, dict[str, Any], str | None]) -> None:
    wave, rate, kwargs, fault = case
    outcome = explain_once(
        lambda: Chat().system("Respond.").user("What is said?", audio=wave, sample_rate=rate),
        lfm(),
        **kwargs,
    )
    if fault in ("rate_zero", "rate_negative", "one_sample", "20ms", "50ms", "3d", "empty"):
        assert outcome == "refused", fault
    if fault in ("nan_one", "inf_one", "all_nan", "baseline", "fill"):
        assert outcome == "refused", fault  # never silently zeroed or ignored


@pytest.mark.parametrize("text", CONTROL)
def test_control_tokens_in_text_are_refused_by_name(text: str) -> None:
    with pytest.raises(InvalidContentError, match="control token") as refused:
        ChatInput(Chat().user(f"Please read {text} aloud"), _HF)
    # The way out it names is the token found, broken up (it named '<|im_start|>' for all)
    broken = str(refused.value).split("(e.g. ")[1].split(")")[0].strip("'\"")
    assert broken.replace(" ", "") in text and ChatInput(Chat().user(broken), _HF).values
    with pytest.raises(InvalidContentError, match="control token"):
        ChatInput(Chat().user(f"Please read {text} aloud"), lfm())
    with pytest.raises(InvalidContentError, match="control token"):  # in the answer explained
        ChatInput(Chat().user("Please read this aloud").assistant(f"Sure: {text}"), _HF)
    # In what the template renders of a message's other keys: a call's arguments,
    # the answer's reasoning
    call = {"type": "function", "function": {"name": "say", "arguments": {"text": text}}}
    with pytest.raises(InvalidContentError, match="control token"):
        ChatInput(Chat().user("Please read this").assistant(tool_calls=[call]).tool("Done."), _HF)
    with pytest.raises(InvalidContentError, match="control token"):
        ChatInput(Chat().user("Please read this").assistant("Yes.", reasoning_content=text), _HF)


def test_partly_nan_audio_is_refused_not_zeroed() -> None:
    wave = np.full(16000, 0.1, dtype=np.float32)
    wave[100] = np.nan
    with pytest.raises(CaptumMLLMError, match="NaN"):
        ChatInput(Chat().user("Hi", audio=wave, sample_rate=16000), lfm())


@pytest.mark.filterwarnings("ignore:audio from .* peaks at")  # "loud" float clips: meant
@pytest.mark.parametrize(
    "examples",
    [random_chats, hugging_face_message_lists, feature_specifications, audio_arrays_and_units],
)
def test_each_strategy_works_or_raises_ours(examples: Callable[[], None]) -> None:
    run_strategy(examples)


def test_a_tokenizer_with_tokens_the_model_lacks_is_refused_by_name() -> None:
    """Tokens added to the tokenizer without resize_token_embeddings raised an
    IndexError from inside the model's embedding (prompt), or a RuntimeError
    from the log-softmax gather (a target)."""
    import copy

    from captum_mllm import HFCausalLMAdapter
    from captum_mllm.errors import InvalidModelError

    model = tiny_hf_adapter()
    tokenizer = copy.deepcopy(model.tokenizer)  # shared: the other tests keep its vocabulary
    tokenizer.add_tokens(["Berliner2"])
    grown = HFCausalLMAdapter(model.model, tokenizer)
    with pytest.raises(InvalidModelError, match=r"'Berliner2'\), past the model's \d+ embedding"):
        ChatInput(Chat().user("A Berliner2 friend"), grown)
    with pytest.raises(InvalidModelError, match="resize_token_embeddings"):
        grown.text_response(" Berliner2")
    assert ChatInput(Chat().user("A friend"), grown).n_itp_features == 2  # its other tokens


@settings(max_examples=300, deadline=None)
@given(
    st.text(
        alphabet="ab 1.,'\n\u0301"
        + "東京今日"
        + "はとてもの"
        + "タワー"
        + "ฉันชอบกิน\u0e49"
        + "。、",
        max_size=30,
    )
)
def test_words_are_whole_clusters_in_order_covering_every_visible_character(text):
    """Words of any script mix (Thai and Japanese cut by BudouX too): spans in
    order, not overlapping, at grapheme cluster edges, covering every character
    but separators; transcript words likewise (split at spaces, as spoken)."""
    import regex

    from captum_mllm.words import is_separator, spoken_word_spans, word_spans

    clusters = {0} | {m.end() for m in regex.finditer(r"\X", text)}
    assert all({a, b} <= clusters for a, b in word_spans(text))
    for spans in (word_spans(text), spoken_word_spans(text)):  # (a transcript splits at spaces)
        assert all(a < b for a, b in spans)
        assert all(b <= a2 for (_, b), (a2, _) in zip(spans, spans[1:], strict=False))
        covered = {k for a, b in spans for k in range(a, b)}
        assert all(k in covered or is_separator(c) for k, c in enumerate(text))
