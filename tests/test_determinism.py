"""Determinism (Part 16): on the CPU the same seed gives bit-identical
attributions across runs, across perturbations_per_eval values and across a
save/load, for every method and every kind of target."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from captum.attr import FeatureAblation, KernelShap, Lime, ShapleyValues, ShapleyValueSampling
from conftest import alone_and_in_threads

from captum_mllm import (
    Chat,
    ChatInput,
    EmbeddingSimilarity,
    LFM2AudioAdapter,
    MultimodalLLMAttribution,
    MultimodalLLMAttributionResult,
)
from captum_mllm.methods import (
    BayesianShapley,
    ExactShapleyValues,
    HierarchicalShapley,
    LeverageKernelShap,
    PairedPermutationSampling,
    RegressionAdjustedShapley,
)
from captum_mllm.testing import speech_like, tiny_hf_adapter, tiny_lfm2_audio

# Long enough that padded batches cross the widths where fused attention kernels
# change their sums; 32 words in 5 groups keep exact methods cheap.
CHAT = (
    Chat()
    .system("You are a helpful assistant.")
    .user(
        "Tell me a story about a cat who lived by the sea in a lighthouse, and about the "
        "quick brown fox who jumps over the lazy dog near the river bank today"
    )
)
GROUPS = [i // 7 for i in range(32)]
METHODS: dict[str, tuple[Any, dict[str, Any]]] = {
    "ShapleyValueSampling": (ShapleyValueSampling, {"n_samples": 3}),
    "KernelShap": (KernelShap, {"n_samples": 30}),
    "Lime": (Lime, {"n_samples": 30}),
    "FeatureAblation": (FeatureAblation, {}),
    "ShapleyValues": (ShapleyValues, {}),
    "ExactShapleyValues": (ExactShapleyValues, {}),
    "PairedPermutationSampling": (PairedPermutationSampling, {"budget": 40, "seed": 1}),
    "LeverageKernelShap": (LeverageKernelShap, {"budget": 40, "seed": 1}),
    "RegressionAdjustedShapley": (RegressionAdjustedShapley, {"budget": 40, "seed": 1}),
    "HierarchicalShapley": (HierarchicalShapley, {"budget": 40, "seed": 1}),
    "BayesianShapley": (BayesianShapley, {"budget": 20, "seed": 1}),  # below 2^5: its own path
}
GEN = {"max_new_tokens": 4}
TARGETS: dict[str, Any] = {
    "log-prob of a given answer": lambda: None,
    "similarity, greedy regeneration": lambda: EmbeddingSimilarity(gen_args=GEN),
    "similarity, sampled regeneration": lambda: EmbeddingSimilarity(
        gen_args=GEN, samples_per_coalition=2, temperature=1.3, seed=7
    ),
}


def run(model: Any, inp: ChatInput, method: str, target: str, ppe: int):
    cls, kwargs = METHODS[method]
    attr = MultimodalLLMAttribution(cls(model), model, target=TARGETS[target]())
    answer = "I am a model" if target.startswith("log-prob") else None
    torch.manual_seed(0)  # Captum's samplers draw from torch's generator
    return attr.attribute(inp, target=answer, perturbations_per_eval=ppe, **kwargs)


def arrays(res: MultimodalLLMAttributionResult) -> list[torch.Tensor]:
    out = [res.seq_attr]
    out += [t for t in (res.token_attr, res.seq_attr_stderr) if t is not None]
    return out


def assert_identical(a: MultimodalLLMAttributionResult, b: MultimodalLLMAttributionResult) -> None:
    for x, y in zip(arrays(a), arrays(b), strict=True):
        assert torch.equal(x, y), (x - y).abs().max()


@pytest.fixture(scope="module")
def model():
    return tiny_hf_adapter()


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("method", list(METHODS))
def test_bit_identical_across_runs_batches_and_save_load(model, tmp_path, method, target):
    inp = ChatInput(CHAT, model, groups=GROUPS)
    first = run(model, inp, method, target, ppe=1)
    again = run(model, inp, method, target, ppe=1)
    assert_identical(first, again)
    for ppe in (5, 32):
        assert_identical(first, run(model, inp, method, target, ppe=ppe))
    back = MultimodalLLMAttributionResult.load(first.save(tmp_path / "res.json"))
    assert_identical(first, back)
    assert bool(first.seq_attr.abs().sum() > 0)  # a game that says something


def test_speech_model_is_bit_identical_across_batches():
    model = LFM2AudioAdapter(*tiny_lfm2_audio())
    chat = (
        Chat().system("Respond.").user("Please answer", audio=speech_like(1.5), sample_rate=16000)
    )
    for baseline in ("drop", "silence"):
        inp = ChatInput(chat, model, audio_unit=0.3, audio_baseline=baseline)
        results = []
        for ppe in (1, 6, 64):
            attr = MultimodalLLMAttribution(ShapleyValueSampling(model), model)
            torch.manual_seed(0)
            results.append(
                attr.attribute(
                    inp, target=torch.arange(300, 306), n_samples=3, perturbations_per_eval=ppe
                )
            )
        assert_identical(results[0], results[1])
        assert_identical(results[0], results[2])


def test_long_rows_are_scored_alone_and_stay_bit_identical(model, monkeypatch):
    from captum_mllm.models import decoder

    inp = ChatInput(CHAT, model, groups=GROUPS)
    batched = run(model, inp, "ShapleyValueSampling", "log-prob of a given answer", ppe=32)
    monkeypatch.setattr(decoder, "LONG_ROW", 0)  # every row is "long" now
    calls: list[int] = []
    score = model._score_rows
    monkeypatch.setattr(
        model, "_score_rows", lambda rows, *a, **k: calls.append(len(rows)) or score(rows, *a, **k)
    )
    alone = [
        run(model, inp, "ShapleyValueSampling", "log-prob of a given answer", ppe=p)
        for p in (1, 32)
    ]
    assert set(calls) == {1}
    assert_identical(alone[0], alone[1])
    assert torch.allclose(alone[0].token_attr, batched.token_attr, atol=1e-4)


@pytest.mark.parametrize("own_logits", [False, True])
@pytest.mark.parametrize("n_target", [1, 2, 3, 5, 7, 10])
def test_a_coalition_scored_alone_gives_its_value_in_a_batch(model, n_target, own_logits):
    """A forward of one short row, or a head over a few target positions, is a
    matrix product of a few rows, which the CPU's BLAS rounds another way:
    such products are padded, so a coalition's value never depends on its batch
    (also through the model's own logits, as for a model whose head cannot be
    split off)."""
    if own_logits:
        model = tiny_hf_adapter()
        model._head_probed = True  # as if the head-split probe had failed
    inp = ChatInput(CHAT, model, groups=GROUPS)
    response = model.response(torch.arange(300, 300 + n_target))
    coalitions = torch.tensor([[1, 0, 1, 0, 1], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    for prefix in (None, model.prefill(inp.to_model_input())):
        together = model.score_masked(inp.to_model_input(coalitions), response, prefix)
        for c, expected in zip(coalitions, together, strict=True):
            alone = model.score_masked(inp.to_model_input(c[None]), response, prefix)[0]
            assert torch.equal(alone, expected), (alone - expected).abs().max()


def test_speech_model_scores_a_coalition_alone_as_in_a_batch():
    """As above for LFM2-Audio, text and audio items (the depthformer's products)."""
    model = LFM2AudioAdapter(*tiny_lfm2_audio())
    chat = (
        Chat().system("Respond.").user("Please answer", audio=speech_like(1.5), sample_rate=16000)
    )
    inp = ChatInput(chat, model, audio_unit=0.3)
    full = inp.to_model_input()
    items = torch.full((5, 9), -1)  # two text tokens, then three audio frames of 8 codes
    items[:2, 0] = torch.tensor([300, 301])
    items[2:, 1:] = torch.randint(0, 100, (3, 8), generator=torch.Generator().manual_seed(1))
    response = model.response(items)
    coalitions = torch.randint(
        0, 2, (5, inp.n_itp_features), generator=torch.Generator().manual_seed(0)
    )
    for prefix in (None, model.prefill(full)):
        together = model.score_masked(inp.to_model_input(coalitions), response, prefix)
        for c, expected in zip(coalitions, together, strict=True):
            alone = model.score_masked(inp.to_model_input(c[None]), response, prefix)[0]
            assert torch.equal(alone, expected), (alone - expected).abs().max()


@pytest.mark.parametrize("speech", [False, True])
def test_a_response_read_alone_gives_its_states_in_a_batch(model, speech):
    """The hidden states over a short response (what EmbeddingSimilarity
    compares) do not depend on the responses read beside it."""
    adapter = LFM2AudioAdapter(*tiny_lfm2_audio()) if speech else model
    responses = [adapter.response(torch.arange(300, 300 + n)) for n in (3, 5, 2, 7)]
    together = adapter.response_states(responses)
    for r, expected in zip(responses, together, strict=True):
        assert torch.equal(adapter.response_states([r])[0], expected)


@pytest.mark.parametrize("speech", [False, True])
def test_a_coalition_generated_alone_gets_the_logits_it_gets_in_a_group(model, monkeypatch, speech):
    """Generation multiplies as many rows as it continues prompts together, and
    the fused attention kernel's decode steps round by that number too: the
    logits a coalition's answer is drawn from do not depend on the coalitions
    generated beside it (greedy answers could flip on a near tie otherwise)."""
    from captum_mllm.models import lfm2_audio_generation

    seen: list[torch.Tensor] = []  # row 0's logits at each draw
    if speech:
        model = LFM2AudioAdapter(*tiny_lfm2_audio())
        chat = Chat().user("Please answer", audio=speech_like(1.5), sample_rate=16000)
        inp = ChatInput(chat, model, audio_unit=0.3)
        gen: dict[str, Any] = {"output_modality": "text+audio"}
        pick = lfm2_audio_generation.pick_tokens
        monkeypatch.setattr(
            lfm2_audio_generation,
            "pick_tokens",
            lambda logits, *a: seen.append(logits[0].clone()) or pick(logits, *a),
        )
    else:
        inp = ChatInput(CHAT, model, groups=GROUPS)
        gen = {"logits_processor": [lambda ids, scores: seen.append(scores[0].clone()) or scores]}
    coalition = (torch.arange(inp.n_itp_features) % 3 != 1).long()[None]
    runs = []
    for group in (1, 2, 3, 5, 17):  # copies of one coalition: one group of rows of one length
        seen.clear()
        model.generate_masked(
            inp.to_model_input(coalition.repeat(group, 1)), max_new_tokens=9, **gen
        )  # the speech model's 6 text tokens, then audio frames (the depthformer's products)
        runs.append(list(seen))
    for run_ in runs[1:]:
        for got, want in zip(run_, runs[0], strict=True):
            assert torch.equal(got, want), (got - want).abs().max()


def test_long_rows_are_generated_alone(model, monkeypatch):
    """Rows over LONG_ROW tokens regenerate one at a time (the fused kernel's
    memory grows linearly with length, the math kernel's quadratically): the
    same answers as the batched path, one row per call."""
    from captum_mllm.models import decoder

    inp = ChatInput(CHAT, model, groups=GROUPS)
    coalitions = torch.tensor([[1, 0, 1, 1, 0], [1, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    batched = model.generate_masked(inp.to_model_input(coalitions), max_new_tokens=5)
    monkeypatch.setattr(decoder, "LONG_ROW", 0)  # every row is "long" now
    calls: list[int] = []
    generate = model._generate
    monkeypatch.setattr(
        model, "_generate", lambda part, *a, **k: calls.append(len(part)) or generate(part, *a, **k)
    )
    alone = model.generate_masked(inp.to_model_input(coalitions), max_new_tokens=5)
    assert calls == [1, 1, 1]
    for a, b in zip(alone, batched, strict=True):
        assert torch.equal(a.ids, b.ids)


def test_explanations_in_threads_equal_their_runs_one_after_the_other(model):
    """Two threads explaining at once on one model (a web demo's requests):
    one thread's forward ran under the other's packed attention and raised on
    its mask, the other's values moved, and whichever exited last put back
    what the other had set. Their model calls now take turns."""
    from transformers import AttentionInterface

    from captum_mllm import AttentionAttribution

    sdpa = AttentionInterface._global_mapping["sdpa"]
    lfm = LFM2AudioAdapter(*tiny_lfm2_audio())
    speech = Chat().user("Listen:", audio=speech_like(1.0), sample_rate=16000)
    jobs = [
        (model, CHAT, PairedPermutationSampling, {"budget": 70, "seed": 1}),
        (model, Chat().system("Be brief.").user("Who are you?"), ShapleyValueSampling,
         {"n_samples": 4, "seed": 2}),
        (lfm, speech, LeverageKernelShap, {"budget": 30, "seed": 3}),
        (lfm, speech, ShapleyValueSampling, {"n_samples": 3, "seed": 4}),
        (model, CHAT, AttentionAttribution, {}),  # switches the model to eager attention
    ]  # fmt: skip

    def explain(i: int) -> Any:
        adapter, chat, cls, kwargs = jobs[i]
        inp = ChatInput(chat, adapter, audio_unit=0.25)
        if cls is AttentionAttribution:
            return cls(adapter).attribute(inp, target="I am.")
        attr = MultimodalLLMAttribution(cls(adapter), adapter)
        return attr.attribute(inp, target="I am.", perturbations_per_eval=4, **kwargs)

    alone, rounds = alone_and_in_threads(explain, len(jobs))
    for together in rounds:
        for i in range(len(jobs)):
            assert not isinstance(together[i], Exception), together[i]
            assert_identical(alone[i], together[i])
            assert together[i].n_model_calls == alone[i].n_model_calls  # not the others' too
        assert AttentionInterface._global_mapping["sdpa"] is sdpa  # put back as it was


def test_a_model_in_training_mode_stays_in_eval_mode_while_any_thread_explains_with_it():
    """The first explanation to finish put training mode back while another
    thread's explanation was still running on the model (dropout on, for a
    model that has it); the last to finish now puts it back."""
    from threading import Thread

    model = tiny_hf_adapter()
    model.model.train()
    seen: list[bool] = []
    layer = model.model.get_decoder().layers[0]  # every forward passes through it
    layer.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    short = ChatInput(Chat().user("Who are you?"), model)
    long = ChatInput(CHAT, model)

    def explain(inp: ChatInput, budget: int) -> None:
        attr = MultimodalLLMAttribution(PairedPermutationSampling(model), model)
        attr.attribute(inp, target="I am.", budget=budget, seed=0, perturbations_per_eval=2)

    first = Thread(target=explain, args=(short, 8))
    second = Thread(target=explain, args=(long, 400))
    first.start()
    second.start()
    first.join()
    second.join()
    assert len(seen) > 50 and not any(seen)  # every forward of both in eval mode
    assert all(m.training for m in model.model.modules())  # and training mode after


def test_a_seeded_captum_sampler_keeps_its_draws_while_other_threads_draw(model):
    """Captum's Lime draws from torch's generator, seeded for the run; an
    unseeded explanation in another thread drew its own seed from that
    generator meanwhile (and an unseeded Captum sampler its orders), moving
    the seeded run's values (now and then in a mix of five kinds of
    explanation in threads; every time with these two threads drawing)."""
    from threading import Event, Thread

    inp = ChatInput(Chat().system("Be brief.").user("Tell me about the weather today"), model)
    lime = MultimodalLLMAttribution(Lime(model), model)

    def seeded() -> torch.Tensor:
        return lime.attribute(
            inp, target="It is so.", n_samples=40, seed=3, perturbations_per_eval=1
        ).seq_attr

    alone = seeded()
    done = Event()

    def unseeded_draws() -> None:
        svs = MultimodalLLMAttribution(ShapleyValueSampling(model), model)
        small = ChatInput(Chat().user("Hi"), model)
        while not done.is_set():
            PairedPermutationSampling(lambda x: x.sum(1)).attribute(torch.ones(1, 4), budget=10)
            svs.attribute(small, target="Yo.", n_samples=1)

    others = [Thread(target=unseeded_draws) for _ in range(2)]
    for thread in others:
        thread.start()
    try:
        together = [seeded() for _ in range(3)]
    finally:
        done.set()
        for thread in others:
            thread.join()
    for values in together:
        assert torch.equal(values, alone)
