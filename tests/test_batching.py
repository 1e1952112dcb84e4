"""Batch building: padding with a suffix, the least-cost cut into length buckets,
matrix products of enough rows, and attention kept off cuDNN's kernel."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from conftest import adapter_and_input

from captum_mllm.models import batching, math_attention
from captum_mllm.models.batching import (
    MIN_PRODUCT_ROWS,
    by_length,
    enough_rows,
    length_buckets,
    pad_rows,
)


def test_pad_rows_appends_the_suffix_after_each_row() -> None:
    rows = [torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([], dtype=torch.long)]
    ids, mask = pad_rows(rows, fill=0, suffix=torch.tensor([9, 8]))
    for b, row in enumerate(rows):
        n = len(row) + 2
        assert ids[b, :n].tolist() == [*row.tolist(), 9, 8]
        assert mask[b].tolist() == [1] * n + [0] * (ids.shape[1] - n)
    ids, mask = pad_rows(rows[:2], fill=7, left=True)
    assert ids.tolist() == [[1, 2, 3], [7, 7, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def _cost(lens: list[int], ends: list[int], call_cost: int) -> int:
    begin, total = 0, 0
    for end in ends:
        total += (end - begin) * lens[end - 1] + call_cost
        begin = end
    return total


@pytest.mark.parametrize("call_cost", [0, 3, 20, 1000])
def test_length_buckets_is_the_cheapest_cut(call_cost: int) -> None:
    g = torch.Generator().manual_seed(call_cost)
    for _ in range(20):
        lens = sorted(torch.randint(1, 30, (7,), generator=g).tolist())
        ends = length_buckets(lens, call_cost)
        assert ends[-1] == len(lens) and ends == sorted(set(ends))
        brute = min(
            _cost(lens, [*cuts, len(lens)], call_cost)
            for k in range(len(lens))
            for cuts in itertools.combinations(range(1, len(lens)), k)
        )
        assert _cost(lens, ends, call_cost) == brute


def test_by_length_scores_the_largest_call_first_and_keeps_the_rows_order() -> None:
    # The later, smaller calls reuse the memory the largest one freed (captum_mllm.heap).
    g = torch.Generator().manual_seed(0)
    rows = [torch.arange(int(n)) for n in torch.randint(1, 40, (30,), generator=g)]
    calls = []

    def score(batch: list[torch.Tensor]) -> torch.Tensor:
        calls.append(len(batch) * (max(len(r) for r in batch) + 2))
        return torch.tensor([[float(len(r))] for r in batch])

    out = by_length(rows, 2, call_cost=20, score=score, max_tokens=200)
    assert len(calls) > 2 and calls[0] == max(calls)
    assert out[:, 0].tolist() == [float(len(r)) for r in rows]


@pytest.mark.parametrize("shape", [(5,), (1, 3, 5), (2, 5), (4, 4, 5)])
def test_enough_rows_pads_a_linear_product_and_keeps_its_outputs(shape: tuple[int, ...]) -> None:
    """Inside ``enough_rows`` a Linear of fewer than MIN_PRODUCT_ROWS rows
    multiplies that many (its outputs equal those rows of a larger product,
    bit for bit) and returns its own shape; the hooks are gone after."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(5, 7))
    x = torch.randn(shape)
    rows = x.reshape(-1, 5)
    big = layer(torch.cat([rows, torch.randn(MIN_PRODUCT_ROWS, 5)]))[: len(rows)]
    seen: list[int] = []  # rows the product was given (after the padding hook)
    layer[0].register_forward_hook(lambda _, a, out: seen.append(a[0].numel() // 5))
    with enough_rows(layer):
        out = layer(x)
    assert out.shape == (*shape[:-1], 7)
    assert torch.equal(out.reshape(-1, 7), big)
    assert seen == [max(len(rows), MIN_PRODUCT_ROWS)]
    assert len(layer[0]._forward_hooks) == 1 and not layer[0]._forward_pre_hooks  # removed


@pytest.mark.parametrize("speech", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_no_forward_lets_attention_reach_cudnn(
    speech: bool, deterministic: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch sends attention on recent GPUs to cuDNN first, which builds a plan
    for every new batch shape: prefill, scoring, generation, hidden states,
    the gradient path and the module's own forward and generate all run with
    cuDNN's kernel off (the flag SDPA reads is False at every call)."""
    model, inp = adapter_and_input(speech, deterministic)
    masked = inp.to_model_input((torch.arange(inp.n_itp_features) % 2).long()[None].repeat(3, 1))
    masked.present[0] = True
    response = model.check_target(torch.arange(5, 9))
    flags: list[bool] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        flags.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ours = math_attention.math_attention_forward  # no SDPA kernel at all (prompts)

    def ours_spy(*args: Any, **kwargs: Any) -> Any:
        flags.append(False)
        return ours(*args, **kwargs)

    monkeypatch.setattr(math_attention, "math_attention_forward", ours_spy)
    prefix = model.prefill(masked)
    answers = model.generate_masked(masked, max_new_tokens=3)
    for call in (
        lambda: model.prefill(masked),
        lambda: model.score_masked(masked, response, prefix),
        lambda: model.generate_masked(masked, max_new_tokens=3),
        lambda: model.response_states(answers, context=inp.encoded),
        lambda: model.next_token_log_probs(model.input_embeddings(inp.encoded)[None], response, 2),
        *(  # what Captum's own LLMAttribution calls on the wrapped module
            []
            if speech
            else [
                lambda: model(input_ids=inp.encoded.input_ids[None]),
                lambda: model.generate(input_ids=inp.encoded.input_ids[None], max_new_tokens=2),
            ]
        ),
    ):
        flags.clear()
        call()
        assert flags and not any(flags)
        assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after


def test_target_log_probs_is_the_whole_log_softmax_in_any_chunk(monkeypatch) -> None:
    logits = torch.randn(7, 3, 50, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([4, 0, 49])
    whole = logits.log_softmax(-1).gather(2, target[None, :, None].expand(7, -1, 1))[..., 0]
    for at_once in (1, 150, 300, 10_000):  # a row at a time, 1 and 2 rows, all of them
        monkeypatch.setattr(batching, "LOGITS_AT_ONCE", at_once)
        assert torch.equal(batching.target_log_probs(logits, target), whole)
    assert batching.target_log_probs(logits[:0], target).shape == (0, 3)


@pytest.mark.parametrize("speech", [False, True])
def test_scores_do_not_depend_on_the_log_softmax_chunk(monkeypatch, speech: bool) -> None:
    """Both adapters' scoring, with the log-softmax over the vocabulary taken a
    row at a time: the same scores to the bit."""
    model, inp = adapter_and_input(speech=speech)
    coalitions = torch.randint(0, 2, (20, inp.n_itp_features), generator=torch.Generator())
    masked = inp.to_model_input(coalitions)
    response = model.response(torch.arange(300, 305))
    prefix = model.prefill(inp.to_model_input())
    whole = model.score_masked(masked, response, prefix)
    calls: list[int] = []
    chunked = batching.target_log_probs

    def counted(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls.append(len(logits))
        return chunked(logits, target)

    monkeypatch.setattr(batching, "LOGITS_AT_ONCE", 1)
    module = "lfm2_audio" if speech else "hf_causal"
    monkeypatch.setattr(f"captum_mllm.models.{module}.target_log_probs", counted)
    assert torch.equal(model.score_masked(masked, response, prefix), whole)
    assert calls  # the chunked path ran
