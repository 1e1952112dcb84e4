"""Oracles for MultimodalLLMAttribution on text chats: stock Captum, brute-force
Shapley, efficiency, and invariance to batching, caching and prefix reuse."""

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from captum.attr import (
    FeatureAblation,
    FeaturePermutation,
    IntegratedGradients,
    KernelShap,
    Lime,
    LLMAttribution,
    Saliency,
    ShapleyValues,
    ShapleyValueSampling,
    TextTemplateInput,
)
from conftest import THINKING_TEMPLATE, brute_force_shapley, game

from captum_mllm import (
    Chat,
    ChatInput,
    EmbeddingSimilarity,
    HFCausalLMAdapter,
    LogProbTarget,
    MultimodalLLMAttribution,
    MultimodalLLMGradientAttribution,
)
from captum_mllm.captum_compat import text_template_input
from captum_mllm.coalitions import CoalitionEvaluator
from captum_mllm.errors import (
    ChatTemplateError,
    InvalidBaselineError,
    InvalidModelError,
    InvalidOptionError,
    PlotError,
    TargetError,
    UnsupportedInputError,
)
from captum_mllm.method_args import trial_seed
from captum_mllm.methods import BayesianShapley, ExactShapleyValues, PairedPermutationSampling
from captum_mllm.testing import tiny_from_config, tiny_hf_adapter

TARGET = "The capital of France is Paris."


def template_input(model, chat: Chat, words: list[str]) -> TextTemplateInput:
    """Captum's equivalent of word features: each word with its leading space."""
    messages = [{"role": t.role, "content": t.text} for t in chat]
    rendered = model.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    user = chat[-1].text
    template = user
    for w in words:
        template = template.replace(w, "{}", 1)
    values = [w if i == 0 else " " + w for i, w in enumerate(words)]
    template = template.replace(" {}", "{}")
    return TextTemplateInput(rendered.replace(user, template), values)


@pytest.mark.parametrize(
    "method, kwargs",
    [
        (FeatureAblation, {}),
        (ShapleyValues, {}),
        (ShapleyValueSampling, {"n_samples": 5}),
    ],
)
def test_matches_stock_captum(model, chat, method, kwargs):
    words = ["Who", "are", "you", "my", "friend"]
    captum_inp = template_input(model, chat, words)
    torch.manual_seed(3)
    stock = LLMAttribution(method(model.model), model.tokenizer).attribute(
        captum_inp, target=TARGET, forward_in_tokens=False, **kwargs
    )
    torch.manual_seed(3)
    ours = MultimodalLLMAttribution(method(model), model).attribute(
        ChatInput(chat, model), target=TARGET, perturbations_per_eval=4, **kwargs
    )
    assert ours.input_tokens == words
    assert ours.output_tokens == stock.output_tokens
    torch.testing.assert_close(ours.seq_attr, stock.seq_attr, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.token_attr, stock.token_attr, atol=1e-4, rtol=0)
    assert ours.seq_attr.abs().max() > 1e-2  # the comparison is not between zeros


#: Position schemes other than the Llama's rotary ones, packed (GPT-2, OPT)
#: or padded (BLOOM's ALiBi and Falcon fail the packing probe): stock
#: Captum's sequence path is the oracle. (Its token-by-token path fails on OPT
#: and BLOOM and is 2.2 off its own sequence path on GPT-2: benchmarks/paths_and_steps.py.)
OTHER_ARCHITECTURES = {
    "gpt2 (learned positions)": ("GPT2Config", {"n_embd": 32, "n_head": 4, "n_layer": 2}),
    "opt (positions from the mask)": (
        "OPTConfig",
        {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2, "ffn_dim": 64,
         "word_embed_proj_dim": 32},
    ),
    "bloom (alibi)": ("BloomConfig", {"hidden_size": 32, "n_head": 4, "n_layer": 2}),
    "falcon": ("FalconConfig", {"hidden_size": 32, "num_attention_heads": 4,
                                "num_hidden_layers": 2}),
}  # fmt: skip


@pytest.mark.parametrize("arch", OTHER_ARCHITECTURES)
def test_other_architectures_match_stock_captums_sequence_path(chat, arch):
    name, sizes = OTHER_ARCHITECTURES[arch]
    adapter = tiny_from_config(name, **sizes)
    inp = ChatInput(chat, adapter, roles=("system", "user"))
    ours = MultimodalLLMAttribution(FeatureAblation(adapter), adapter).attribute(inp, target=TARGET)
    stock = LLMAttribution(FeatureAblation(adapter.model), adapter.tokenizer).attribute(
        text_template_input(inp), target=TARGET, forward_in_tokens=False
    )
    torch.testing.assert_close(ours.token_attr, stock.token_attr, atol=1e-5, rtol=0)
    assert ours.token_attr.abs().max() > 1e-2
    # the probe keeps packing where it holds (a wrong position id fails it)
    assert adapter.packs() == (name in ("GPT2Config", "OPTConfig"))


@pytest.mark.parametrize("text_unit, roles", [("word", ("user",)), ("turn", ("system", "user"))])
def test_exact_shapley_equals_brute_force_and_is_efficient(model, chat, text_unit, roles):
    inp = ChatInput(
        chat.assistant("I am a model.").user("More."), model, roles=roles, text_unit=text_unit
    )
    assert inp.n_itp_features <= 6
    res = MultimodalLLMAttribution(ShapleyValues(model), model).attribute(
        inp, target=TARGET, perturbations_per_eval=16
    )
    values = game(LogProbTarget(), model, inp, res.target_ids)
    expected = brute_force_shapley(values, inp.n_itp_features)
    torch.testing.assert_close(res.seq_attr, expected[0], atol=2e-4, rtol=0)
    torch.testing.assert_close(res.token_attr, expected[1:], atol=2e-4, rtol=0)
    n = inp.n_itp_features
    full, empty = values(torch.stack([torch.ones(n), torch.zeros(n)]))[:, 0]
    assert res.seq_attr.sum().item() == pytest.approx((full - empty).item(), abs=2e-4)
    # the value of a coalition is the teacher-forced log-prob of the target
    assert res.n_unique_coalitions == 2**n


def test_batches_when_no_perturbations_per_eval_is_given(model, chat):
    """Captum's default scores one coalition a forward; ours hands the adapter
    64 coalitions a call on a CPU, with the same values."""
    inp = ChatInput(chat, model)
    attr = MultimodalLLMAttribution(ShapleyValueSampling(model), model)
    torch.manual_seed(0)
    one = attr.attribute(inp, target=TARGET, n_samples=4, perturbations_per_eval=1)
    torch.manual_seed(0)
    default = attr.attribute(inp, target=TARGET, n_samples=4)
    torch.testing.assert_close(default.token_attr, one.token_attr, atol=1e-5, rtol=0)
    assert default.n_model_calls <= 3 < one.n_model_calls  # prefix, then the coalitions


def test_batching_caching_and_prefix_reuse_change_nothing(model, chat):
    inp = ChatInput(chat, model)
    attr = MultimodalLLMAttribution(ShapleyValueSampling(model), model)
    results = []
    for ppe, cache, prefix in [
        (1, True, True),
        (7, True, True),
        (32, True, True),
        (7, False, False),
        (32, False, True),
    ]:
        torch.manual_seed(0)
        results.append(
            attr.attribute(
                inp,
                target=TARGET,
                n_samples=4,
                perturbations_per_eval=ppe,
                cache_coalitions=cache,
                reuse_prefix=prefix,
            )
        )
    for res in results[1:]:
        torch.testing.assert_close(res.token_attr, results[0].token_attr, atol=1e-5, rtol=0)
    cached, uncached = results[1], results[3]
    assert cached.n_coalitions == uncached.n_coalitions
    assert cached.n_unique_coalitions < uncached.n_unique_coalitions == uncached.n_coalitions
    assert results[2].n_model_calls < results[0].n_model_calls


def _pushed_tokens(model, run):
    """Tokens (not padding) pushed through the decoder by scoring while ``run()`` runs."""
    pushed = [0]

    def count(_, args, kwargs):  # scoring forwards (with a mask): their real tokens
        if kwargs.get("attention_mask") is not None:
            pushed[0] += int(kwargs["attention_mask"][:, -kwargs["input_ids"].shape[1] :].sum())

    hook = model.model.get_decoder().register_forward_pre_hook(count, with_kwargs=True)
    try:
        return run(), pushed[0]
    finally:
        hook.remove()


@pytest.mark.parametrize("blind_to", [None, "position_ids", "attention_mask"])
def test_rows_that_begin_as_the_full_chat_read_those_positions_from_the_cache(
    chat, monkeypatch, blind_to
):
    """A coalition keeping the first words reads them from the full chat's cache
    (exact values of all 2^n coalitions, so every leading run occurs): fewer
    tokens pushed, the values of no reuse, the same in any batch. A model that
    would read the shared positions wrongly (here: one that ignores position
    ids or the mask's holes) fails the probe and pushes every token."""
    from captum_mllm.methods import ExactShapleyValues

    model = tiny_hf_adapter()
    if blind_to is not None:
        forward = model.model.forward

        def blind(*args, **kwargs):
            if blind_to == "attention_mask" and kwargs.get("attention_mask") is not None:
                kwargs["attention_mask"] = torch.ones_like(kwargs["attention_mask"])
            else:
                kwargs.pop(blind_to, None)
            return forward(*args, **kwargs)

        monkeypatch.setattr(model.model, "forward", blind)
    inp = ChatInput(chat.user("Tell me a story about the sea, please."), model)
    attr = MultimodalLLMAttribution(ExactShapleyValues(model), model)
    # right-padded batches: packed rows also share their starts with each other
    # (tests/test_packing.py), which this count would mix in
    model.packing = False
    prefix = model.prefill(inp.to_model_input())  # probes the model once

    def run(**kwargs):
        kwargs = {"perturbations_per_eval": 16, **kwargs}
        return _pushed_tokens(model, lambda: attr.attribute(inp, target=TARGET, **kwargs))

    shared, pushed = run()
    plain, pushed_plain = run(reuse_prefix=False)
    torch.testing.assert_close(shared.token_attr, plain.token_attr, atol=1e-5, rtol=0)
    assert model._shares_leads is (blind_to is None)
    assert len(prefix.shared) == (16 if blind_to is None else 0)
    if blind_to is None:
        other, _ = run(perturbations_per_eval=5)
        assert torch.equal(other.token_attr, shared.token_attr)  # pure per coalition
        model._shares_leads = False  # the untouched prefix alone
        prefix_only, pushed_prefix_only = run()
        torch.testing.assert_close(prefix_only.token_attr, plain.token_attr, atol=1e-5, rtol=0)
        n = inp.n_itp_features
        every = (torch.arange(2**n)[:, None] >> torch.arange(n)) & 1
        leads = prefix.leads(inp.to_model_input(every).rows(prefix.length))
        assert pushed_prefix_only - pushed == sum(leads) > 2**n // 2
        assert pushed_plain - pushed_prefix_only == 2**n * prefix.length


def test_logits_at_target_positions_only_change_nothing(model, chat):
    """The head applied to each row's target positions (the default for a plain
    decoder + head) gives the values of the model's own logits; a model that
    caps its logits fails the probe and keeps its own."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from captum_mllm import HFCausalLMAdapter

    inp = ChatInput(chat, model)
    response = model.response(torch.tensor(model.tokenizer.encode(TARGET)))
    coalitions = (
        torch.rand(12, inp.n_itp_features, generator=torch.Generator().manual_seed(0)) > 0.5
    ).long()
    masked = inp.to_model_input(coalitions)
    assert model._split_head() is not None
    split = model.score_masked(masked, response)
    parts, model._head_split = model._head_split, None  # the model's own logits
    try:
        whole = model.score_masked(masked, response)
    finally:
        model._head_split = parts
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=0)
    assert split.std() > 1e-2

    capped = Gemma2Config(
        vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=1.0,
    )  # fmt: skip
    torch.manual_seed(0)
    gemma = HFCausalLMAdapter(Gemma2ForCausalLM(capped).eval(), model.tokenizer)
    assert gemma._split_head() is None


class _InOrderGiven(CoalitionEvaluator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "row_length": None})


@pytest.mark.parametrize("method", ["exact", "stock sampler"])
def test_coalitions_of_similar_length_share_a_forward(model, chat, monkeypatch, method):
    """Our estimators and the prefetch of Captum's samplers hand the model
    coalitions shortest first: less padding than in the order drawn, same values
    (right-padded batches, as for a model that cannot be packed)."""
    from captum_mllm import attribution
    from captum_mllm.methods import ExactShapleyValues

    monkeypatch.setattr(model, "packing", False)

    inp = ChatInput(chat.user("Tell me a story about the sea, please."), model)
    algorithm = ExactShapleyValues if method == "exact" else ShapleyValueSampling
    budget = {} if method == "exact" else {"n_samples": 4}
    padding = []

    def count(_, args, kwargs):
        mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
        if mask is not None:  # the pushed positions' (the cache's holes are not padding)
            padding[-1] += int((mask[:, -ids.shape[1] :] == 0).sum())

    hook = model.model.get_decoder().register_forward_pre_hook(count, with_kwargs=True)
    results = []
    try:
        for by_length in (True, False):
            if not by_length:
                monkeypatch.setattr(attribution, "CoalitionEvaluator", _InOrderGiven)
            padding.append(0)
            torch.manual_seed(0)
            results.append(
                MultimodalLLMAttribution(algorithm(model), model).attribute(
                    inp, target=TARGET, perturbations_per_eval=8, **budget
                )
            )
    finally:
        hook.remove()  # the model is shared by the session's tests
    assert padding[0] < 0.5 * padding[1]
    assert torch.equal(results[0].token_attr, results[1].token_attr)


def test_forward_in_tokens_gives_the_same_values(model, chat):
    inp = ChatInput(chat, model)
    attr = MultimodalLLMAttribution(FeatureAblation(model), model)
    by_seq = attr.attribute(inp, target=TARGET)
    for use_cached in (True, False):
        by_tok = attr.attribute(
            inp, target=TARGET, forward_in_tokens=True, use_cached_outputs=use_cached
        )
        torch.testing.assert_close(by_tok.token_attr, by_seq.token_attr, atol=1e-4, rtol=0)
        assert by_tok.n_model_calls > by_seq.n_model_calls


def test_generated_target_is_the_greedy_continuation(model, chat):
    inp = ChatInput(chat, model)
    res = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(
        inp, gen_args={"max_new_tokens": 6}
    )
    prompt = inp.encoded.input_ids[None]
    greedy = model.model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False
    )[0, prompt.shape[1] :]
    assert torch.equal(res.target_ids, greedy)
    assert res.token_attr.shape == (len(greedy), inp.n_itp_features)
    assert torch.isfinite(res.token_attr).all()


@pytest.mark.parametrize("method", [Lime, KernelShap])
def test_lime_and_kernel_shap_give_sequence_attributions(model, chat, method):
    inp = ChatInput(chat, model)
    attr = MultimodalLLMAttribution(method(model), model)
    torch.manual_seed(0)
    one = attr.attribute(inp, target=TARGET, n_samples=20)
    torch.manual_seed(0)
    batched = attr.attribute(inp, target=TARGET, n_samples=20, perturbations_per_eval=8)
    assert one.token_attr is None and one.seq_attr.shape == (5,)
    torch.testing.assert_close(one.seq_attr, batched.seq_attr, atol=1e-4, rtol=0)
    with pytest.raises(PlotError, match="plot_seq_attr"):  # Captum's ValueError before
        one.plot_token_attr()


def test_prob_target_and_result_table(model, chat):
    inp = ChatInput(chat, model)
    res = MultimodalLLMAttribution(FeatureAblation(model), model, attr_target="prob").attribute(
        inp, target=TARGET
    )
    frame = res.to_dataframe()
    assert list(frame["feature"]) == inp.values
    assert {"modality", "turn", "role", "start_s", "end_s", "seq_attr"} <= set(frame.columns)
    assert frame.shape[1] == 7 + len(res.output_tokens)
    fig, ax = res.plot_token_attr()
    assert [t.get_text() for t in ax.get_xticklabels()] == inp.values
    fig, ax = res.plot_seq_attr()
    assert res.wall_time > 0
    # A long answer's probability underflows float32: seq_attr all zero, silently
    long = " ".join([TARGET] * 4)
    with pytest.warns(UserWarning, match="below float32's normal range") as said:
        under = MultimodalLLMAttribution(FeatureAblation(model), model, attr_target="prob")
        res = under.attribute(inp, target=long)
    assert said[0].filename == __file__ and not res.seq_attr.any() and res.token_attr.any()


def test_bad_arguments_raise(model, chat):
    inp = ChatInput(chat, model)
    attr = MultimodalLLMAttribution(FeatureAblation(model), model)
    with pytest.raises(TargetError):
        attr.attribute(inp, target="")
    with pytest.raises(TargetError, match="only white space"):  # "the assistant turn is empty"
        attr.attribute(inp, target=" \n")
    with pytest.raises(TargetError):
        attr.attribute(inp, target=3)  # type: ignore[arg-type]
    with pytest.raises(TargetError):
        attr.attribute(inp, target=TARGET, gen_args={"max_new_tokens": 2})
    captum_inp = TextTemplateInput("{} are you?", values=["Who"])  # stock Captum's path too
    for count in (0, -3, 2.0):  # transformers raised its own ValueError on the first two
        for given in (inp, captum_inp):
            with pytest.raises(InvalidOptionError, match="max_new_tokens must be an int of at"):
                attr.attribute(given, gen_args={"max_new_tokens": count})
    for sampled in ({"do_sample": True, "temperature": 1.5}, {"top_k": 5}):  # came out greedy
        with pytest.raises(InvalidOptionError, match="greedy"):
            attr.attribute(inp, gen_args={"max_new_tokens": 3, **sampled})
    answered = ChatInput(chat.assistant(TARGET), model)
    with pytest.raises(TargetError, match="names another"):  # the chat's answer went unread
        attr.attribute(answered, target=TARGET + " again")
    same = attr.attribute(inp, target=TARGET).seq_attr
    ids = model.text_response(TARGET).ids
    for given in (TARGET, ids, ids[None]):  # the chat's own answer again: no conflict
        torch.testing.assert_close(attr.attribute(answered, target=given).seq_attr, same)
    for given, target in ((answered, None), (inp, TARGET), (inp, ids)):  # went unread
        with pytest.raises(InvalidOptionError, match="keep_eos"):
            attr.attribute(given, target=target, keep_eos=True)
    with pytest.raises(UnsupportedInputError):
        attr.attribute("Who are you?", target=TARGET)  # type: ignore[arg-type]
    with pytest.raises(InvalidModelError):
        MultimodalLLMAttribution(FeatureAblation(lambda x: x))
    with pytest.raises(InvalidOptionError, match="not read beside target="):  # it went unread
        MultimodalLLMAttribution(FeatureAblation(model), model, "prob", target=LogProbTarget())
    with pytest.raises(UnsupportedInputError, match=r"FeatureAblation\(model\)"):
        MultimodalLLMAttribution(FeatureAblation, model)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedInputError, match="one chat"):  # values all came out 0
        MultimodalLLMAttribution(FeaturePermutation(model), model)
    # A method built on another model: that model went unread, the adapter's was explained
    other = tiny_hf_adapter(seed=1)
    for built_on in (other, other.model):
        with pytest.raises(InvalidModelError, match="another model"):
            MultimodalLLMAttribution(FeatureAblation(built_on), model)
    MultimodalLLMAttribution(FeatureAblation(model.model), model)  # the module it wraps


# Part 9a regressions ------------------------------------------------------------------


def test_target_ids_as_the_tokenizer_returns_them(model, chat):
    inp = ChatInput(chat, model)
    attr = MultimodalLLMAttribution(FeatureAblation(model), model)
    as_text = attr.attribute(inp, target=TARGET)
    ids = model.tokenizer(TARGET, add_special_tokens=False, return_tensors="pt").input_ids
    assert ids.shape[0] == 1
    as_batch = attr.attribute(inp, target=ids)  # (1, T)
    torch.testing.assert_close(as_batch.seq_attr, as_text.seq_attr)
    torch.testing.assert_close(as_batch.token_attr, as_text.token_attr)
    for bad in (ids.float(), torch.tensor([5, 10**6]), torch.tensor([-3, 5]), ids[None]):
        with pytest.raises(TargetError):
            attr.attribute(inp, target=bad)


def test_num_trials_and_attr_target_are_checked(model, chat):
    inp = ChatInput(chat, model)
    attr = MultimodalLLMAttribution(FeatureAblation(model), model)
    for trials in (0, -1):
        with pytest.raises(InvalidOptionError):
            attr.attribute(inp, target=TARGET, num_trials=trials)
    with pytest.raises(InvalidOptionError):
        MultimodalLLMAttribution(FeatureAblation(model), model, attr_target="logit")


def test_method_arguments_that_captum_takes_silently_are_refused(model, chat):
    # Each of these ran without a word: all-zero attributions (a nonzero
    # baseline leaves every feature present), NaN (no samples), or ignored.
    inp = ChatInput(chat, model)
    ablation = MultimodalLLMAttribution(FeatureAblation(model), model)
    sampling = MultimodalLLMAttribution(ShapleyValueSampling(model), model)
    kernel = MultimodalLLMAttribution(KernelShap(model), model)
    for attr in (ablation, sampling, kernel):
        with pytest.raises(InvalidBaselineError):
            attr.attribute(inp, target=TARGET, baselines=0.5)
        with pytest.raises(InvalidOptionError, match="additional_forward_args"):
            attr.attribute(inp, target=TARGET, additional_forward_args=(1,))
    for attr in (ablation, sampling, MultimodalLLMAttribution(ExactShapleyValues(model), model)):
        for mask in ([[0, 0, 1]], [[0, 0, 1, 1, -1]], [[0.0, 0, 1, 1, 2]]):  # deep errors, or
            with pytest.raises(InvalidOptionError, match="feature_mask"):  # -1 meant 3 things
                attr.attribute(inp, target=TARGET, feature_mask=torch.tensor(mask))
    for ppe in (0, 2.5):  # Captum's AssertionError, where the README promised ours
        with pytest.raises(InvalidOptionError, match="perturbations_per_eval"):
            ablation.attribute(inp, target=TARGET, perturbations_per_eval=ppe)
    assert (
        ablation.attribute(inp, target=TARGET, perturbations_per_eval=np.int64(2))
        .seq_attr.ne(0)
        .any()
    )
    for attr in (sampling, kernel):
        with pytest.raises(InvalidOptionError, match="n_samples"):
            attr.attribute(inp, target=TARGET, n_samples=0)
    with pytest.raises(TypeError, match="n_sample"):
        ablation.attribute(inp, target=TARGET, n_sample=5)  # a typo
    calls = model.n_forward_calls
    with pytest.raises(TypeError, match=r"\['n_sample'\]"):
        sampling.attribute(inp, n_sample=5)  # refused before the answer is generated
    assert model.n_forward_calls == calls
    with pytest.warns(UserWarning, match="underdetermined"):
        kernel.attribute(inp, target=TARGET, n_samples=inp.n_itp_features)
    long = ChatInput(Chat().user(" ".join(["word"] * 25)), model)  # Captum's default: 25
    with pytest.warns(UserWarning, match="n_samples=25 coalitions"):
        kernel.attribute(long, target=TARGET)
    word = ChatInput(Chat().user("Hello"), model)  # Captum's ValueError: "probs ... nan"
    with pytest.raises(UnsupportedInputError, match="one feature has none"):
        kernel.attribute(word, target=TARGET)
    whole = ablation.attribute(word, target=TARGET).seq_attr  # the remedy it names
    torch.testing.assert_close(sampling.attribute(word, target=TARGET).seq_attr, whole)
    with pytest.raises(InvalidBaselineError):  # Captum's tuple form
        ablation.attribute(inp, target=TARGET, baselines=(torch.ones(1, inp.n_itp_features),))
    zero = ablation.attribute(inp, target=TARGET, baselines=0)  # the default, said aloud
    torch.testing.assert_close(zero.seq_attr, ablation.attribute(inp, target=TARGET).seq_attr)
    assert bool(zero.seq_attr.ne(0).any())


@pytest.mark.parametrize("method", [PairedPermutationSampling, BayesianShapley])
def test_trials_draw_their_own_coalitions_and_report_the_means_stderr(model, chat, method):
    """With a seed, trial t runs on its own seed (the first on the given one):
    the result is the mean of those runs, and its standard error that of the
    mean: independent draws' in quadrature, a posterior's (the same design on
    every seed, near enough) averaged, not shrunk by the square root of 3."""
    attr = MultimodalLLMAttribution(method(model), model)
    inp = ChatInput(chat, model)
    runs = [attr.attribute(inp, target=TARGET, budget=20, seed=trial_seed(7, t)) for t in range(3)]
    mean = attr.attribute(inp, target=TARGET, budget=20, seed=7, num_trials=3)
    assert len({tuple(r.seq_attr.tolist()) for r in runs}) == 3 or method is BayesianShapley
    torch.testing.assert_close(mean.seq_attr, sum(r.seq_attr for r in runs) / 3)
    errs = torch.stack([r.seq_attr_stderr for r in runs])
    spread = errs.pow(2).sum(0).sqrt() / 3 if method.stderr_over_seeds else errs.mean(0)
    torch.testing.assert_close(mean.seq_attr_stderr, spread)
    assert mean.n_unique_coalitions >= max(r.n_unique_coalitions for r in runs)


def test_a_chat_longer_than_the_models_positions_warns(model, chat):
    """Llama computes rotary positions past its trained 1,024 without a word:
    the explanation of such a chat would silently rest on untrained positions."""
    attr = MultimodalLLMAttribution(FeatureAblation(model), model)
    assert model.max_positions == 1024
    long = ChatInput(Chat().user("word " * 336), model, text_unit="turn")
    assert len(long.encoded) + len(model.text_response("I")) <= 1024
    assert len(long.encoded) + len(model.text_response("I am a cat")) > 1024
    with pytest.warns(UserWarning, match="more than the 1024 the model was trained on") as caught:
        attr.attribute(long, target="I am a cat")
    assert caught[0].filename == __file__  # the caller's line, not the library's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attr.attribute(long, target="I")  # within them, no warning


@pytest.mark.filterwarnings("ignore:integrated gradients' attributions")  # 4 steps
def test_a_model_in_training_mode_is_explained_in_eval_mode(chat):
    """A model built from a config, or in the middle of fine-tuning, is in
    training mode: dropout made every value random, so two identical calls
    gave other attributions. Explanations run in eval mode, and each module's
    mode is put back after."""
    from transformers import LlamaForCausalLM

    evaluated = tiny_hf_adapter()
    config = evaluated.model.config
    config.attention_dropout = 0.5
    model = LlamaForCausalLM(config)
    model.load_state_dict(evaluated.model.state_dict())
    model.train()
    model.lm_head.eval()  # a mixed model: this one stays in eval mode after
    adapter = HFCausalLMAdapter(model, evaluated.tokenizer)
    inp = ChatInput(chat, adapter)
    runs = [
        MultimodalLLMAttribution(FeatureAblation(a), a).attribute(inp, target=TARGET)
        for a in (adapter, adapter, evaluated)
    ]
    torch.testing.assert_close(runs[0].token_attr, runs[1].token_attr, rtol=0, atol=0)
    torch.testing.assert_close(runs[0].token_attr, runs[2].token_attr)
    grad = MultimodalLLMGradientAttribution(IntegratedGradients(adapter), adapter)
    first, again = (grad.attribute(inp, target=TARGET, n_steps=4) for _ in range(2))
    torch.testing.assert_close(first.token_attr, again.token_attr, rtol=0, atol=0)
    assert model.training and model.model.layers[0].self_attn.training
    assert not model.lm_head.training


def test_captums_all_orders_shapley_names_the_exact_method(model):
    """Captum's ShapleyValues walks n! orders in Python (10 features: half an
    hour) for the 2^n coalitions the cache evaluates: from 7 features on, a
    warning names ExactShapleyValues, which gives the same values."""
    attr = MultimodalLLMAttribution(ShapleyValues(model), model)
    seven = ChatInput(Chat().user("one two three four five six seven"), model)
    with pytest.warns(UserWarning, match="5,040 orders.*ExactShapleyValues") as caught:
        res = attr.attribute(seven, target=TARGET)
    assert caught[0].filename == __file__
    exact = MultimodalLLMAttribution(ExactShapleyValues(model), model)
    same = exact.attribute(seven, target=TARGET).seq_attr
    torch.testing.assert_close(res.seq_attr, same, atol=1e-4, rtol=1e-4)  # float32 sums
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attr.attribute(ChatInput(Chat().user("one two three four five six"), model), target=TARGET)


def test_from_pretrained_reads_a_bfloat16_checkpoint_in_float32_on_the_cpu(tmp_path, chat):
    """A bfloat16 checkpoint (most chat models') loaded as it was stored ran
    in bfloat16 on the CPU, where log-probabilities keep about 3 digits."""
    tiny = tiny_hf_adapter()
    tiny.model.to(torch.bfloat16).save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = HFCausalLMAdapter.from_pretrained(str(tmp_path), device="cpu")
    assert loaded.model.dtype == torch.float32
    kept = HFCausalLMAdapter.from_pretrained(str(tmp_path), device="cpu", dtype=torch.bfloat16)
    assert kept.model.dtype == torch.bfloat16
    # A model that accelerate placed (device_map="auto" over several GPUs) was
    # moved whole onto the default device after loading.
    moved = []
    to = torch.nn.Module.to
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            torch.nn.Module, "to", lambda self, *a, **k: moved.append(a) or to(self, *a, **k)
        )
        HFCausalLMAdapter.from_pretrained(str(tmp_path), device_map={"": "cpu"})
        assert not moved
        HFCausalLMAdapter.from_pretrained(str(tmp_path))
        assert moved
    with pytest.raises(InvalidOptionError, match="not both"):
        HFCausalLMAdapter.from_pretrained(str(tmp_path), device="cpu", device_map="auto")
    # transformers' old name of dtype= went unread: our float32 won over it
    old = HFCausalLMAdapter.from_pretrained(str(tmp_path), device="cpu", torch_dtype="bfloat16")
    assert old.model.dtype == torch.bfloat16
    with pytest.raises(InvalidOptionError, match="not both"):
        HFCausalLMAdapter.from_pretrained(str(tmp_path), dtype="float32", torch_dtype="float16")
    # Where the checkpoint comes from reached the model alone: the tokenizer came
    # from the main branch (another revision's vocabulary) or failed without the token
    import transformers

    seen = []
    load = transformers.AutoTokenizer.from_pretrained
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            transformers.AutoTokenizer,
            "from_pretrained",
            lambda *a, **k: seen.append(k) or load(*a, **k),
        )
        hub = {"revision": "main", "local_files_only": True, "cache_dir": str(tmp_path / "c")}
        HFCausalLMAdapter.from_pretrained(str(tmp_path), device="cpu", **hub)
    assert seen and hub.items() <= seen[-1].items()
    # A GPU this machine lacks was refused by torch once the weights had loaded
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _no_load)
        with pytest.raises(InvalidOptionError, match="'cuda:99': this machine has"):
            HFCausalLMAdapter.from_pretrained(str(tmp_path), device="cuda:99")
        with pytest.raises(InvalidOptionError, match="'xpu:5': this machine has"):
            HFCausalLMAdapter.from_pretrained(str(tmp_path), device=torch.device("xpu", 5))
        from captum_mllm.models import default_model

        patch.setattr(default_model, "converted_default_model_dir", _no_load)
        with pytest.raises(InvalidOptionError, match="'cuda:99': this machine has"):
            default_model.load_default_model(device="cuda:99")


def _no_load(*args, **kwargs):
    raise AssertionError("the weights loaded")


def test_from_pretrained_reads_a_processors_chat_template_file(tmp_path, chat):
    """Vision-language checkpoints (Llava's, SmolVLM's) keep the chat template
    for their processor in chat_template.json, which AutoTokenizer does not
    read: loading one raised "has no chat template (a base model?)"."""
    import json

    tiny = tiny_hf_adapter()
    tiny.model.save_pretrained(tmp_path)
    tokenizer = copy.deepcopy(tiny.tokenizer)  # shared: the other tests keep its template
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    template = "<s>{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    loaded = HFCausalLMAdapter.from_pretrained(str(tmp_path), device="cpu")
    assert loaded.tokenizer.chat_template == template
    rendered = "<s>[system] You are a helpful assistant.\n[user] Who are you, my friend?\n"
    assert (
        loaded.tokenizer.decode(ChatInput(chat, loaded).encoded.input_ids)
        == rendered + "[assistant] "
    )
    (tmp_path / "chat_template.json").unlink()  # a base model: said as before
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ChatInput(chat, HFCausalLMAdapter.from_pretrained(str(tmp_path), device="cpu"))


def test_non_finite_values_warn(model, chat, monkeypatch):
    """A float16 model can overflow to NaN: its attributions come back NaN,
    with a warning naming the likely cause rather than without a word."""
    score = model.score_masked

    def overflowing(*args, **kwargs):
        values = score(*args, **kwargs)
        values[0, 0] = float("nan")
        return values

    monkeypatch.setattr(model, "score_masked", overflowing)
    attr = MultimodalLLMAttribution(FeatureAblation(model), model)
    with pytest.warns(UserWarning, match="NaN or infinite.*float16") as caught:
        attr.attribute(ChatInput(chat, model), target=TARGET)
    assert caught[0].filename == __file__  # pointing at the caller


def test_inspect_forward_sees_what_stock_captum_shows_it(model, chat):
    """Captum's ``_inspect_forward(prompt, response, probabilities)`` hook (it
    was accepted and never called): the same prompts as stock Captum's, each
    distinct coalition once, with the total then each token's probability."""
    captum_inp = template_input(model, chat, ["Who", "are", "you", "my", "friend"])
    seen: dict[str, dict[str, tuple[str, list[float]]]] = {"stock": {}, "ours": {}, "chat": {}}

    def hook(name):
        return lambda prompt, said, probs: seen[name].setdefault(prompt, (said, probs))

    LLMAttribution(FeatureAblation(model.model), model.tokenizer).attribute(
        captum_inp,
        target=TARGET,
        use_cached_outputs=False,  # its cache is wrong on transformers 5 (see the README)
        _inspect_forward=hook("stock"),  # its token-by-token path
    )
    ours = MultimodalLLMAttribution(FeatureAblation(model), model)
    ours.attribute(captum_inp, target=TARGET, _inspect_forward=hook("ours"))
    res = ours.attribute(ChatInput(chat, model), target=TARGET, _inspect_forward=hook("chat"))
    assert len(seen["stock"]) == 1 + 5 and seen["stock"].keys() == seen["ours"].keys()
    assert seen["chat"].keys() == seen["ours"].keys()  # the chat's prompts, as text
    for prompt, (said, probs) in seen["chat"].items():
        assert said == TARGET and len(probs) == 1 + len(res.output_tokens)
        assert probs[0] == pytest.approx(math.prod(probs[1:]), rel=1e-4)
        assert probs == pytest.approx(seen["ours"][prompt][1], rel=1e-4)
        assert probs == pytest.approx(seen["stock"][prompt][1], rel=1e-4)
    # A probability target shows its probabilities as they are (they were exp()'d again)
    seen["prob"] = {}
    as_probs = MultimodalLLMAttribution(FeatureAblation(model), model, target=LogProbTarget("prob"))
    as_probs.attribute(ChatInput(chat, model), target=TARGET, _inspect_forward=hook("prob"))
    assert {k: pytest.approx(v[1], rel=1e-5) for k, v in seen["chat"].items()} == {
        k: v[1] for k, v in seen["prob"].items()
    }


@pytest.mark.filterwarnings("ignore:Lime fits")  # two samples: its values are not read here
@pytest.mark.parametrize(
    "method, kwargs",
    [(FeatureAblation, {}), (Lime, {"n_samples": 2}), (BayesianShapley, {"budget": 8})],
)
def test_output_probs_are_the_answers_probabilities_as_stock_captum_scores_them(
    model, chat, method, kwargs, tmp_path
):
    """Captum's ``LLMAttributionResult.output_probs`` (each answer token's
    probability under the whole input), which stock Captum leaves None: the
    probabilities its ``_inspect_forward`` shows for the full prompt, whether or
    not the method evaluated the full coalition (Lime's two samples may not)."""
    captum_inp = template_input(model, chat, ["Who", "are", "you", "my", "friend"])
    shown = []
    LLMAttribution(FeatureAblation(model.model), model.tokenizer).attribute(
        captum_inp,
        target=TARGET,
        use_cached_outputs=False,  # its cache is wrong on transformers 5 (see the README)
        _inspect_forward=lambda *seen: shown.append(seen[2]),
    )  # its first prompt is the full one
    for attr_target in ("log_prob", "prob"):
        ours = MultimodalLLMAttribution(method(model), model, attr_target=attr_target)
        for inp in (captum_inp, ChatInput(chat, model)):
            res = ours.attribute(inp, target=TARGET, **kwargs)
            assert res.output_probs.tolist() == pytest.approx(shown[0][1:], rel=1e-4)
        # read before a store file closes (a probability target raised on a closed one)
        store = tmp_path / f"{attr_target}.sqlite"
        res = ours.attribute(ChatInput(chat, model), target=TARGET, store=store, **kwargs)
        assert res.output_probs.tolist() == pytest.approx(shown[0][1:], rel=1e-4)
    similar = EmbeddingSimilarity(gen_args={"max_new_tokens": 2})  # no probabilities
    res = MultimodalLLMAttribution(method(model), model, target=similar).attribute(
        ChatInput(chat, model), target=TARGET, **kwargs
    )
    assert res.output_probs is None


@pytest.mark.parametrize("thinking", [False, True])
def test_a_final_assistant_turn_is_the_default_target(model, chat, thinking):
    """target="..." and a chat ending with that answer explain one thing. With a
    Qwen3-style template (thinking on) the chat's answer is read after an empty
    <think> block; target= text was read straight after the generation prompt."""
    if thinking:
        tokenizer = copy.deepcopy(model.tokenizer)  # shared: the other tests keep theirs
        tokenizer.chat_template = THINKING_TEMPLATE
        model = HFCausalLMAdapter(model.model, tokenizer)
    inp = ChatInput(chat, model)
    ids = inp.encoded.input_ids.clone()
    attr = MultimodalLLMAttribution(FeatureAblation(model), model)
    given = attr.attribute(ChatInput(chat.assistant(TARGET), model))
    explicit = attr.attribute(inp, target=TARGET)
    assert given.output_tokens == explicit.output_tokens
    assert explicit.input_tokens == inp.values
    torch.testing.assert_close(given.token_attr, explicit.token_attr)
    assert torch.equal(inp.encoded.input_ids, ids)  # the caller's input is left as it was
    assert (inp.answered(TARGET) is inp) is not thinking  # nothing rebuilt when nothing differs
    with pytest.raises(TargetError, match="only used when target is None"):  # as without it
        attr.attribute(inp, target=TARGET, gen_args={"max_new_tokens": 3})
    gradients = MultimodalLLMGradientAttribution(Saliency(model), model)
    torch.testing.assert_close(
        gradients.attribute(ChatInput(chat.assistant(TARGET), model)).seq_attr,
        gradients.attribute(inp, target=TARGET).seq_attr,
    )
    if thinking:  # gpt-oss's template writes the date too: its warning came twice
        tokenizer.chat_template = "{{ strftime_now('%Y') }}" + THINKING_TEMPLATE
        with pytest.warns(UserWarning, match="today's date"):
            dated = ChatInput(chat, model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert dated.answered(TARGET) is not dated


def test_a_text_generation_pipeline_is_explained_as_its_model(model, chat):
    """pipeline("text-generation", ...) is how many Hugging Face users hold a
    chat model; HFCausalLMAdapter(pipe) raised a TypeError (no tokenizer)."""
    from transformers import pipeline

    pipe = pipeline("text-generation", model=model.model, tokenizer=model.tokenizer)
    adapter = HFCausalLMAdapter(pipe)
    assert adapter.model is model.model and adapter.tokenizer is model.tokenizer

    def explain(on):
        attr = MultimodalLLMAttribution(ExactShapleyValues(on), on)
        return attr.attribute(ChatInput(chat, on), target=TARGET).token_attr

    assert torch.equal(explain(adapter), explain(model))
    with pytest.raises(InvalidModelError, match="needs LlamaForCausalLM's tokenizer"):
        HFCausalLMAdapter(model.model)
    with pytest.raises(InvalidModelError, match=r"HFCausalLMAdapter\(pipeline\)"):
        MultimodalLLMAttribution(FeatureAblation(pipe), pipe)


def test_a_peft_model_is_explained_as_its_merged_model(model, chat):
    """A LoRA fine-tune (PEFT's PeftModel) passes the cache and logits_to_keep
    on to the model it wraps; they were read off its own forward, so the
    cache went by its deprecated name (a FutureWarning per call; it goes in
    transformers 5.40) and every position's logits were computed."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    tuned = get_peft_model(copy.deepcopy(model.model), lora)
    adapter = HFCausalLMAdapter(tuned, model.tokenizer)
    merged = HFCausalLMAdapter(copy.deepcopy(tuned).merge_and_unload(), model.tokenizer)

    def explain(on):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no deprecated keyword reaches the model
            attr = MultimodalLLMAttribution(ExactShapleyValues(on), on)
            return attr.attribute(ChatInput(chat, on), target=TARGET).token_attr

    ours = explain(adapter)
    torch.testing.assert_close(ours, explain(merged), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, explain(model), atol=1e-3)  # the LoRA weights count


def test_a_compiled_model_is_explained_as_the_model(model, chat, caplog):
    """torch.compile's OptimizedModule hands its keywords on to the model it
    wraps; they were read off its own forward, so the cache went by its
    deprecated name (transformers warned) and every position's logits were computed."""
    import logging

    compiled = torch.compile(model.model, backend="eager")  # no compiler needed
    adapter = HFCausalLMAdapter(compiled, model.tokenizer)
    logging.Logger.warning_once.cache_clear()  # type: ignore[attr-defined]  # transformers'
    attr = MultimodalLLMAttribution(FeatureAblation(adapter), adapter)
    ours = attr.attribute(ChatInput(chat, adapter), target=TARGET).token_attr
    assert "deprecated" not in caplog.text
    plain = MultimodalLLMAttribution(FeatureAblation(model), model)
    want = plain.attribute(ChatInput(chat, model), target=TARGET).token_attr
    torch.testing.assert_close(ours, want)


def test_captum_sampling_is_prefetched_in_full_batches(model, chat):
    """Captum's ShapleyValueSampling asks one order at a time; its coalitions are
    drawn ahead (torch's generator put back) and evaluated in full batches, so
    it meets only cache hits, with stock Captum's values."""
    words = ["Who", "are", "you", "my", "friend"]
    torch.manual_seed(5)
    stock = LLMAttribution(ShapleyValueSampling(model.model), model.tokenizer).attribute(
        template_input(model, chat, words), target=TARGET, forward_in_tokens=False, n_samples=8
    )
    torch.manual_seed(5)
    ours = MultimodalLLMAttribution(ShapleyValueSampling(model), model).attribute(
        ChatInput(chat, model), target=TARGET, perturbations_per_eval=64, n_samples=8
    )
    after = torch.rand(1)
    torch.manual_seed(5)
    _ = [torch.randperm(5) for _ in range(8)]  # Captum's own draws, and nothing more
    assert torch.equal(after, torch.rand(1))  # the generator ends where Captum leaves it
    torch.testing.assert_close(ours.token_attr, stock.token_attr, atol=1e-4, rtol=0)
    assert ours.n_coalitions == 8 * 5 + 1  # what Captum asked for
    assert ours.n_model_calls <= 3  # prefix, then all unique coalitions in one batch
    # Grouped by a feature_mask, Captum orders 3 groups: so does the prefetch
    # (it ordered the 5 words, and evaluated coalitions Captum never asked for).
    mask = torch.tensor([[0, 0, 1, 2, 2]])
    torch.manual_seed(5)
    grouped = MultimodalLLMAttribution(ShapleyValueSampling(model), model).attribute(
        ChatInput(chat, model), target=TARGET, perturbations_per_eval=64, n_samples=8,
        feature_mask=mask,
    )  # fmt: skip
    assert grouped.n_unique_coalitions <= 2**3 and grouped.n_model_calls <= 3


def test_prefetched_sampling_shows_its_evaluations_in_progress(model, chat, capsys):
    """With show_progress=True the prefetch ran in silence, all the model's
    work, then Captum's bar ran to 100% at once over cache hits."""
    attr = MultimodalLLMAttribution(ShapleyValueSampling(model), model)
    ours = attr.attribute(
        ChatInput(chat, model), target=TARGET, perturbations_per_eval=4, n_samples=8,
        show_progress=True,
    )  # fmt: skip
    err = capsys.readouterr().err
    done = f"{ours.n_unique_coalitions}/{ours.n_unique_coalitions}"
    ours_at, captums_at = err.find("evaluating coalitions: 100%"), err.find("Shapley Value")
    assert ours_at >= 0 and done in err[ours_at:] and captums_at > ours_at
    attr.attribute(ChatInput(chat, model), target=TARGET, n_samples=8)
    assert "evaluating coalitions" not in capsys.readouterr().err  # unless asked for
