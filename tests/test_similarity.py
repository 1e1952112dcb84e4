"""EmbeddingSimilarity: the regenerate-and-compare value function."""

import math

import pytest
import torch
from captum.attr import FeatureAblation, ShapleyValues
from conftest import brute_force_shapley, game

from captum_mllm import (
    ChatInput,
    EmbeddingSimilarity,
    LogProbTarget,
    MultimodalLLMAttribution,
    captum_compat,
)
from captum_mllm.errors import InvalidOptionError, TargetError
from captum_mllm.methods import BayesianShapley

GEN = {"max_new_tokens": 6}


@pytest.mark.parametrize("embedding, context", [("static", "response"), ("contextual", "chat")])
def test_exact_shapley_and_efficiency(model, chat, embedding, context):
    inp = ChatInput(chat, model)
    sim = EmbeddingSimilarity(embedding, context=context, gen_args=GEN)
    res = MultimodalLLMAttribution(ShapleyValues(model), model, target=sim).attribute(
        inp, perturbations_per_eval=32
    )
    assert res.token_attr is None
    value = game(sim, model, inp, res.target_ids)
    expected = brute_force_shapley(value, 5)
    torch.testing.assert_close(res.seq_attr, expected[0], atol=1e-5, rtol=0)
    # efficiency: sum = sim(full, full) - sim(full, answer without any feature)
    full, empty = value(torch.tensor([[1.0] * 5, [0.0] * 5]))
    assert full.item() == pytest.approx(1.0, abs=1e-5)  # cosine of the answer with itself
    assert res.seq_attr.sum().item() == pytest.approx((full - empty).item(), abs=1e-5)
    assert len(res.responses) == 2**5
    assert res.seq_attr.abs().max() > 1e-3


def test_batched_regeneration_equals_one_at_a_time(model, chat):
    inp = ChatInput(chat, model)
    masks = torch.tensor([[int(b) for b in f"{i:05b}"] for i in range(32)], dtype=torch.float)
    batched = model.generate_masked(inp.to_model_input(masks), **GEN)
    for m, answer in zip(masks, batched, strict=True):
        alone = model.generate_masked(inp.to_model_input(m[None]), **GEN)[0]
        assert torch.equal(alone.ids, answer.ids)
    # the full chat's answer is what the log-prob path would explain
    sim_res = MultimodalLLMAttribution(
        FeatureAblation(model), model, target=EmbeddingSimilarity(gen_args=GEN)
    )
    lp_res = MultimodalLLMAttribution(FeatureAblation(model), model, target=LogProbTarget())
    assert torch.equal(
        sim_res.attribute(inp).target_ids, lp_res.attribute(inp, gen_args=GEN).target_ids
    )
    greedy = lp_res.attribute(inp, gen_args=GEN, keep_eos=True).target_ids
    assert torch.equal(batched[-1].ids, greedy)
    # gen_args to attribute set the explained answer alone: 3 tokens, against
    # which every coalition's answer of up to 25 was compared
    same = sim_res.attribute(inp, gen_args=GEN)  # the target's own settings: fine
    assert torch.equal(same.target_ids, sim_res.attribute(inp).target_ids)
    with pytest.raises(InvalidOptionError, match="differ from the target's"):
        sim_res.attribute(inp, gen_args={**GEN, "max_new_tokens": GEN["max_new_tokens"] - 1})
    with pytest.raises(InvalidOptionError, match="forward_in_tokens"):  # it went unread
        sim_res.attribute(inp, forward_in_tokens=True)


def test_stop_strings_and_eos_token_id_end_a_batched_answer_as_they_end_it_alone(model, chat):
    """transformers needs the tokenizer for stop_strings (it raised), and pads a
    row that they or a call's eos_token_id end while the others go on: that row
    came back with pad tokens after its end."""
    inp = ChatInput(chat, model)
    masks = torch.tensor([[int(b) for b in f"{i:05b}"] for i in range(32)], dtype=torch.float)
    plain = model.generate_masked(inp.to_model_input(masks), **GEN)
    words = [model.tokenizer.decode(t) for t in plain[-1].ids[1:-1].tolist()]
    at, stop = next((i, w) for i, w in enumerate(words, 1) if w.strip().isalpha())
    settings = {**GEN, "stop_strings": [stop]}  # ends the full chat's answer early
    batched = model.generate_masked(inp.to_model_input(masks), **settings)
    assert batched[-1].text.endswith(stop) and len(batched[-1]) <= at + 1
    ended = 0
    for m, answer, long in zip(masks, batched, plain, strict=True):
        alone = model.generate_masked(inp.to_model_input(m[None]), **settings)[0]
        assert torch.equal(alone.ids, answer.ids)
        ended += len(answer) < len(long)
    assert 0 < ended < 32  # some rows end early beside others that go on
    # The same with an eos_token_id of the call's own: a row that one ends is padded.
    lens = [len(r) for r in inp.to_model_input(masks).rows()]
    b, eos = next(
        (b, int(a.ids[1]))
        for b, a in enumerate(plain)
        if any(lens[c] == lens[b] and int(a.ids[1]) not in plain[c].ids for c in range(32))
    )
    settings = {**GEN, "eos_token_id": eos}
    batched = model.generate_masked(inp.to_model_input(masks), **settings)
    assert batched[b].ids.tolist() == plain[b].ids[:2].tolist()
    for m, answer in zip(masks, batched, strict=True):
        alone = model.generate_masked(inp.to_model_input(m[None]), **settings)[0]
        assert torch.equal(alone.ids, answer.ids)
    with pytest.raises(InvalidOptionError, match="max_new_tokens"):  # it went unread
        model.generate_masked(inp.to_model_input(masks[:2]), max_length=40)


def test_a_calls_own_eos_token_id_ends_the_explained_answer_as_the_models_does(model, chat):
    """keep_eos=False dropped the model's end token but kept a call's own
    eos_token_id, which ended the answer the same way."""
    attr = MultimodalLLMAttribution(FeatureAblation(model), model, target=LogProbTarget())
    inp = ChatInput(chat, model)
    plain = attr.attribute(inp, gen_args=GEN).target_ids.tolist()
    at = next(i for i in range(1, len(plain)) if plain[i] not in plain[:i])
    settings = {**GEN, "eos_token_id": plain[at]}
    assert attr.attribute(inp, gen_args=settings).target_ids.tolist() == plain[:at]
    kept = attr.attribute(inp, gen_args=settings, keep_eos=True).target_ids.tolist()
    assert kept == plain[: at + 1]
    with pytest.raises(TargetError, match="only its end token"):  # it ended at once
        attr.attribute(inp, gen_args={**GEN, "eos_token_id": plain[0]})
    # EmbeddingSimilarity reads its answers without it too
    sim = EmbeddingSimilarity(gen_args=settings)
    res = MultimodalLLMAttribution(FeatureAblation(model), model, target=sim).attribute(inp)
    assert res.target_ids.tolist() == plain[:at]
    end = model.tokenizer.decode([plain[at]])
    assert not any(said.endswith(end) for said in res.responses.values())


A = torch.tensor([[1.0, 2.0, 2.0], [3.0, 0.0, -1.0]])  # two token vectors
REF = torch.tensor([1.0, 0.0, 0.0])


@pytest.mark.parametrize(
    "reducer, vector",
    [
        ("mean", [2.0, 1.0, 0.5]),
        ("sum", [4.0, 2.0, 1.0]),
        ("max", [3.0, 2.0, 2.0]),
        ("min", [1.0, 0.0, -1.0]),
        ("first", [1.0, 2.0, 2.0]),
        ("last", [3.0, 0.0, -1.0]),
    ],
)
def test_reducers(reducer, vector):
    assert EmbeddingSimilarity(reducer=reducer).reducer(A).tolist() == vector


@pytest.mark.parametrize(
    "similarity, value",
    [
        ("cosine", 2.0 / 2.29128784747792),  # [2, 1, .5] . [1, 0, 0] / |[2, 1, .5]|
        ("euclidean", 1.0 / (1.0 + 1.5)),  # |[1, 1, .5]| = 1.5
        ("negative_euclidean", -1.5),
        ("dot", 2.0),
        ("manhattan", 1.0 / (1.0 + 2.5)),
    ],
)
def test_similarities(similarity, value):
    sim = EmbeddingSimilarity(similarity=similarity)
    got = sim.similarity(sim.reducer(A)[None], REF)
    assert got.item() == pytest.approx(value, abs=1e-6)


def test_callables_empty_answers_and_zero_vectors(model):
    def embed(texts):
        return torch.tensor([[float(len(t)), float(t.count("a"))] for t in texts])

    sim = EmbeddingSimilarity(
        embed, similarity=lambda a, b: -(a - b).abs().sum(1), empty_value=-7.0
    )
    empty = model.response(torch.tensor([], dtype=torch.long))
    text = model.text_response("a banana")
    zero_text = model.text_response(" ")  # embeds to [1, 0]: not zero
    ref = sim.vectors(model, [text])[0][0]
    values = sim.values(model, [text, empty, zero_text], ref)
    assert values.tolist() == [0.0, -7.0, -(abs(1 - 8) + abs(0 - 4))]
    zero = EmbeddingSimilarity(lambda texts: torch.zeros(len(texts), 3), empty_value=0.5)
    assert zero.values(model, [text], torch.ones(3)).tolist() == [0.5]  # zero norm
    assert not torch.isnan(EmbeddingSimilarity().values(model, [empty, empty], None)).any()
    # Callables of the wrong shape failed deep inside (an IndexError, a zip
    # error), a scalar similarity was broadcast to every coalition, NaN vectors
    # turned into empty_value without a word
    for bad in (lambda t: torch.ones(len(t)), lambda t: torch.ones(1, 3)):
        with pytest.raises(TargetError, match="must return an"):
            EmbeddingSimilarity(bad).vectors(model, [text, zero_text])
    scalar = EmbeddingSimilarity(embed, similarity=lambda a, b: (a @ b).sum())
    with pytest.raises(TargetError, match="one value per row"):
        scalar.values(model, [text, zero_text], ref)
    with pytest.raises(TargetError, match="reduce each response"):
        EmbeddingSimilarity(reducer=lambda x: x.sum()).vectors(model, [text])
    nan = EmbeddingSimilarity(lambda t: torch.full((len(t), 2), math.nan))
    with pytest.warns(UserWarning, match="NaN or infinite"):
        assert nan.values(model, [text], torch.ones(2)).tolist() == [0.0]


def test_sampled_mode_is_reproducible_and_reports_sample_std(model, chat):
    inp = ChatInput(chat, model)

    def embed(texts):
        return torch.tensor([[len(t) + 1.0, sum(map(ord, t)) % 17 + 1.0] for t in texts])

    def run():
        sim = EmbeddingSimilarity(
            embed, gen_args=GEN, samples_per_coalition=3, temperature=1.5, seed=5
        )
        attr = MultimodalLLMAttribution(FeatureAblation(model), model, target=sim)
        return sim, attr.attribute(inp, perturbations_per_eval=8)

    sim, first = run()
    _, second = run()
    torch.testing.assert_close(first.seq_attr, second.seq_attr)
    assert first.responses == second.responses
    # Recompute each sample's feature-ablation attribution from the recorded answers.
    reference = embed([first.response_text])[0]

    def sample_values(coalition):
        return sim.similarity(embed(first.responses[coalition]), reference)  # (k,)

    full = sample_values((1, 1, 1, 1, 1))
    per_sample = torch.stack(
        [full - sample_values(tuple(0 if j == i else 1 for j in range(5))) for i in range(5)], dim=1
    )  # (k, n)
    torch.testing.assert_close(first.seq_attr, per_sample.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(first.seq_attr_std, per_sample.std(0), atol=1e-5, rtol=0)
    assert len(first.responses[(1, 1, 1, 1, 1)]) == 3


def test_normalisers_return_new_results(model, chat):
    res = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(
        ChatInput(chat, model), target="Paris."
    )
    raw = res.seq_attr.clone()
    shifted = res.normalized("power_shift", power=2)
    assert shifted.seq_attr.sum().item() == pytest.approx(1.0)
    x = raw - raw.min()
    torch.testing.assert_close(shifted.seq_attr, x**2 / (x**2).sum())
    mm = res.normalized("min_max")
    assert mm.seq_attr.min() == 0 and mm.seq_attr.max() == 1
    assert res.normalized("abs_sum").seq_attr.abs().sum().item() == pytest.approx(1.0)
    assert (
        res.normalized("abs_sum")
        .token_attr.abs()
        .sum(1)
        .allclose(torch.ones(len(res.output_tokens)))
    )
    torch.testing.assert_close(res.normalized("identity").seq_attr, raw)
    torch.testing.assert_close(res.seq_attr, raw)  # untouched
    with pytest.raises(InvalidOptionError):
        res.normalized("softmax")
    for power in (-1, 0, float("nan"), "2"):  # NaN, a uniform split, zeros, a TypeError
        with pytest.raises(InvalidOptionError, match="power must be"):
            res.normalized("power_shift", power=power)
    torch.testing.assert_close(
        res.normalized("power_shift", power=0.5).seq_attr.sum(), torch.tensor(1.0)
    )
    # standard errors are in the old units: a rescaled copy drops them (it kept them)
    sampled = MultimodalLLMAttribution(BayesianShapley(model), model).attribute(
        ChatInput(chat, model), target="Paris.", budget=20, seed=0
    )
    assert sampled.seq_attr_stderr is not None and sampled.token_attr_stderr is not None
    for kind in ("abs_sum", "min_max", "power_shift"):
        scaled = sampled.normalized(kind)
        assert scaled.seq_attr_stderr is None and scaled.token_attr_stderr is None
    assert sampled.normalized("identity").seq_attr_stderr is sampled.seq_attr_stderr


def test_bad_arguments():
    with pytest.raises(InvalidOptionError):
        EmbeddingSimilarity("sparse")
    with pytest.raises(InvalidOptionError):
        EmbeddingSimilarity(reducer="median")
    with pytest.raises(InvalidOptionError):
        EmbeddingSimilarity(similarity="jaccard")
    with pytest.raises(InvalidOptionError):
        EmbeddingSimilarity(samples_per_coalition=0)
    # a float count failed deep inside, True ran as one sample, a float seed ran
    # as another seed, and a NaN empty value spread to every attribution
    bad_settings = [
        ("samples_per_coalition", 2.5),
        ("samples_per_coalition", True),
        ("seed", 1.5),
        ("seed", -1),
        ("empty_value", math.nan),
        ("empty_value", "0"),
    ]
    for bad in (dict([kv]) for kv in bad_settings):
        with pytest.raises(InvalidOptionError, match="must be"):
            EmbeddingSimilarity(temperature=1.0, **bad)
    # Settings that would go unread (only contextual states read the chat; a
    # callable returns whole vectors).
    with pytest.raises(InvalidOptionError, match="only read with"):
        EmbeddingSimilarity("static", context="chat")
    with pytest.raises(InvalidOptionError, match="reducer= is not read"):
        EmbeddingSimilarity(lambda texts: torch.ones(len(texts), 2), reducer="max")


def test_a_value_function_given_to_attribute_names_the_constructor(model, chat):
    """target= of attribute() is the answer; a Target there raised "gen_args is
    only used when target is None" or "must be a str, a Tensor or None"."""
    attr = MultimodalLLMAttribution(FeatureAblation(model), model)
    sim = EmbeddingSimilarity(gen_args=GEN)
    for kwargs in ({}, {"gen_args": GEN}):
        with pytest.raises(TargetError, match=r"MultimodalLLMAttribution\(method, model, target="):
            attr.attribute(ChatInput(chat, model), target=sim, **kwargs)


@pytest.mark.parametrize("embedding, context", [("static", "response"), ("contextual", "chat")])
def test_spoken_answers_on_lfm2_audio(embedding, context):
    from captum_mllm import Chat, LFM2AudioAdapter
    from captum_mllm.testing import speech_like, tiny_lfm2_audio

    lfm = LFM2AudioAdapter(*tiny_lfm2_audio())
    chat = Chat().system("Be brief.").user("Say it.", audio=speech_like(0.8), sample_rate=16000)
    inp = ChatInput(chat, lfm, audio_unit=0.4)
    gen = {"max_new_tokens": 9, "output_modality": "text+audio"}
    sim = EmbeddingSimilarity(embedding, context=context, gen_args=gen)
    res = MultimodalLLMAttribution(ShapleyValues(lfm), lfm, target=sim).attribute(
        inp, perturbations_per_eval=32
    )
    assert (res.target_ids[:, 0] < 0).any()  # the answer holds audio frames
    n = inp.n_itp_features
    value = game(sim, lfm, inp, res.target_ids)
    expected = brute_force_shapley(value, n)
    torch.testing.assert_close(res.seq_attr, expected[0], atol=1e-5, rtol=0)
    full, empty = value(torch.stack([torch.ones(n), torch.zeros(n)]))
    assert res.seq_attr.sum().item() == pytest.approx((full - empty).item(), abs=1e-5)
    assert full.item() == pytest.approx(1.0, abs=1e-5)
    assert any("♪" in text for text in res.responses.values())


def test_audio_sampling_settings_reach_lfm2_and_are_reproducible():
    from captum_mllm import Chat, LFM2AudioAdapter
    from captum_mllm.testing import speech_like, tiny_lfm2_audio

    lfm = LFM2AudioAdapter(*tiny_lfm2_audio())
    inp = ChatInput(
        Chat().user("Say it.", audio=speech_like(0.5), sample_rate=16000), lfm, audio_unit="turn"
    )
    gen = {"max_new_tokens": 9, "output_modality": "text+audio"}

    def answers(seed, **kw):
        sim = EmbeddingSimilarity(gen_args=gen, seed=seed, **kw)
        masked = inp.to_model_input(torch.ones(3, inp.n_itp_features))
        seeds = [0, 1, 2] if sim.sampled else None
        return [r.ids.tolist() for r in lfm.generate_masked(masked, seeds=seeds, **sim.gen_args)]

    greedy = answers(0)
    assert greedy[0] == greedy[1] == greedy[2]
    sampled = answers(0, audio_temperature=5.0)
    assert sampled == answers(0, audio_temperature=5.0)  # same seeds, same answers
    text_part = [[row for row in r if row[0] >= 0] for r in sampled]
    assert text_part == [[row for row in r if row[0] >= 0] for r in greedy]  # text stays greedy
    assert sampled != greedy  # audio frames were sampled
    assert sampled[0] != sampled[1]  # each row its own seed
    with pytest.raises(InvalidOptionError, match=r"not \['top_p'\]"):  # liquid-audio has none
        answers(0, top_p=0.9)


def test_sampled_values_do_not_depend_on_batches_order_or_earlier_calls(model, chat):
    from captum.attr import ShapleyValueSampling

    inp = ChatInput(chat, model)
    sim = EmbeddingSimilarity(gen_args=GEN, samples_per_coalition=2, temperature=1.5, seed=3)
    attr = MultimodalLLMAttribution(ShapleyValueSampling(model), model, target=sim)

    def run(ppe):
        torch.manual_seed(0)  # Captum's permutations; our sampling never reads this RNG
        return attr.attribute(inp, n_samples=3, perturbations_per_eval=ppe)

    first = run(1)
    for again in (run(7), run(64), run(1)):  # other batch sizes, then the same object again
        assert torch.equal(again.seq_attr, first.seq_attr)
        assert torch.equal(again.seq_attr_std, first.seq_attr_std)
        assert again.responses == first.responses
    samples = first.responses[(1, 1, 1, 1, 1)]
    assert len(samples) == 2 and first.seq_attr.abs().max() > 0
    other_seed = EmbeddingSimilarity(gen_args=GEN, samples_per_coalition=2, temperature=1.5, seed=4)
    torch.manual_seed(0)
    changed = MultimodalLLMAttribution(ShapleyValueSampling(model), model, target=other_seed)
    assert changed.attribute(inp, n_samples=3).responses != first.responses


def test_sampling_settings_in_gen_args_mean_what_the_arguments_do(model, chat):
    """``do_sample`` / ``temperature`` given the transformers way, in gen_args,
    are seeded per coalition as the arguments are (they were drawn from the
    global generator, so a value depended on its batch); ``do_sample`` alone
    samples at temperature 1; contradictions, other samplers and several
    answers a coalition raise."""
    from captum.attr import ShapleyValueSampling

    inp = ChatInput(chat, model)

    def run(sim, ppe):
        torch.manual_seed(0)
        attr = MultimodalLLMAttribution(ShapleyValueSampling(model), model, target=sim)
        return attr.attribute(inp, n_samples=2, perturbations_per_eval=ppe)

    by_argument = run(EmbeddingSimilarity(gen_args=GEN, temperature=1.0, seed=3), 1)
    for gen_args in ({"do_sample": True, "temperature": 1.0}, {"do_sample": True}):
        sim = EmbeddingSimilarity(gen_args={**GEN, **gen_args}, seed=3)
        for ppe in (1, 8):
            res = run(sim, ppe)
            assert torch.equal(res.seq_attr, by_argument.seq_attr)
            assert res.responses == by_argument.responses
    greedy = run(EmbeddingSimilarity(gen_args=GEN), 8)
    assert greedy.responses != by_argument.responses  # it did sample
    with pytest.raises(InvalidOptionError, match="do_sample=False"):
        EmbeddingSimilarity(gen_args={"do_sample": False, "top_k": 5})
    captums = EmbeddingSimilarity(gen_args=captum_compat.DEFAULT_GEN_ARGS)  # None: unset
    assert not captums.sampled
    with pytest.raises(InvalidOptionError, match="given twice"):
        EmbeddingSimilarity(gen_args={"temperature": 0.5}, temperature=0.7)
    typical = EmbeddingSimilarity(gen_args={**GEN, "do_sample": True, "typical_p": 1.5})
    with pytest.raises(InvalidOptionError, match=r"typical_p must be a number in \[0, 1\]"):
        run(typical, 8)
    beams = EmbeddingSimilarity(gen_args={**GEN, "num_beams": 2, "num_return_sequences": 2})
    with pytest.raises(InvalidOptionError, match="samples_per_coalition"):
        run(beams, 8)


@pytest.mark.parametrize(
    "temperature, top_k", [(0.7, 20), (1.3, 0), (1.0, 50), (0.5, 3), (1.0, None)]
)
def test_lfm2_sampling_draws_from_what_transformers_warpers_leave(temperature, top_k):
    """LFM2-Audio's text sampler: temperature, then top-k, as transformers'
    warpers chain them (a Hugging Face model's sampling runs those warpers)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper

    from captum_mllm.models.sampling import sampling_probs

    logits = 3 * torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    warped = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        warped = TopKLogitsWarper(top_k)(None, warped)
    torch.testing.assert_close(sampling_probs(logits, temperature, top_k), warped.softmax(-1))


@pytest.mark.parametrize(
    "settings",
    [{"typical_p": 0.2}, {"epsilon_cutoff": 0.03}, {"eta_cutoff": 0.03}, {"top_h": 0.3},
     {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "min_p": 0.05}, "config"],
)  # fmt: skip
def test_a_seeded_row_is_what_model_generate_samples_under_that_seed(model, chat, settings):
    """One row sampled with seed s is what model.generate(do_sample=True) draws
    after torch.manual_seed(s), from transformers' own warpers: typical_p, the
    epsilon and eta cutoffs and top-h raised, and a generation config's were unread."""
    import copy

    from captum_mllm import HFCausalLMAdapter

    tuned = copy.deepcopy(model.model)
    if settings == "config":  # a checkpoint's own: read by both
        tuned.generation_config.update(typical_p=0.2, temperature=0.9)
        settings = {}
    adapter = HFCausalLMAdapter(tuned, model.tokenizer)
    inp = ChatInput(chat, adapter)
    masked = inp.to_model_input(torch.ones(1, inp.n_itp_features))
    ids = masked.rows()[0][None]

    def ours(seed, **given):
        said = adapter.generate_masked(masked, seeds=[seed], do_sample=True, **GEN, **given)
        return said[0].ids.tolist()

    def theirs(seed):
        torch.manual_seed(seed)
        out = tuned.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                             pad_token_id=0, **GEN, **settings)  # fmt: skip
        return out[0, ids.shape[1] :].tolist()

    drawn = [ours(seed, **settings) for seed in range(6)]
    assert [theirs(seed)[: len(d)] for seed, d in zip(range(6), drawn, strict=True)] == drawn
    plain = HFCausalLMAdapter(model.model, model.tokenizer)
    unwarped = [plain.generate_masked(masked, seeds=[s], do_sample=True, **GEN)[0].ids.tolist()
                for s in range(6)]  # fmt: skip
    assert drawn != unwarped  # the settings changed what was drawn


def test_sampled_answers_take_the_models_generation_config(model, chat):
    """model.generate(do_sample=True) samples with the checkpoint's generation
    config (Qwen2.5's temperature 0.7, top-k 20, top-p 0.8); ours sampled at
    temperature 1 over every token, and top_p raised."""
    import copy

    from captum_mllm import HFCausalLMAdapter
    from captum_mllm.fingerprint import model_digest

    tuned = copy.deepcopy(model.model)
    tuned.generation_config.update(temperature=0.7, top_k=20, top_p=0.8)
    qwen_like = HFCausalLMAdapter(tuned, model.tokenizer)

    def said(adapter, **kwargs):
        sim = EmbeddingSimilarity(gen_args=GEN, samples_per_coalition=3, seed=1, **kwargs)
        attr = MultimodalLLMAttribution(FeatureAblation(adapter), adapter, target=sim)
        return attr.attribute(ChatInput(chat, adapter)).responses

    theirs = said(qwen_like)
    assert theirs == said(model, temperature=0.7, top_k=20, top_p=0.8)
    assert theirs != said(model)  # transformers' own defaults: temperature 1, top-k 50
    assert said(model) == said(model, temperature=1.0, top_k=50, top_p=1.0)
    assert said(qwen_like, top_k=0) == said(model, temperature=0.7, top_k=0, top_p=0.8)
    assert model_digest(tuned) != model_digest(model.model)  # a store of one is not the other's
    min_p_config = copy.deepcopy(model.model)  # a generation config's min-p went unread
    min_p_config.generation_config.update(temperature=2.0, min_p=0.3)
    min_p = said(HFCausalLMAdapter(min_p_config, model.tokenizer))
    assert min_p == said(model, temperature=2.0, min_p=0.3) != said(model, temperature=2.0)


def test_temperature_zero_is_greedy_and_impossible_settings_raise(model, chat):
    """Temperature 0 is greedy (as in liquid-audio's sampler; it sampled at 1),
    top-k 0 keeps every token (as in transformers; it crashed); a negative or
    infinite temperature and a negative top-k raise (a negative one ran)."""
    from captum.attr import FeatureAblation

    inp = ChatInput(chat, model)

    def run(**kwargs):
        sim = EmbeddingSimilarity(gen_args=GEN, seed=3, **kwargs)
        return MultimodalLLMAttribution(FeatureAblation(model), model, target=sim).attribute(inp)

    greedy = run()
    assert run(temperature=0.0).responses == greedy.responses
    assert run(top_k=0).responses == run(top_k=10**6).responses != greedy.responses
    for bad in ({"temperature": -1.0}, {"temperature": float("inf")}, {"top_k": -2},
                {"audio_temperature": float("nan")}, {"top_k": 2.5}, {"top_p": 1.5},
                {"top_p": True}):  # fmt: skip
        with pytest.raises(InvalidOptionError, match="must be"):
            EmbeddingSimilarity(**bad)
    with pytest.raises(InvalidOptionError, match="temperature must be"):
        model.generate_masked(inp.to_model_input(), do_sample=True, temperature=-0.5)
