"""Memory (Part 16): out-of-memory halves the batch and changes no value; batches
respect a token budget; a coalition that never fits raises a named error."""

from __future__ import annotations

import pytest
import torch
from captum.attr import ShapleyValueSampling

from captum_mllm import Chat, ChatInput, MultimodalLLMAttribution
from captum_mllm.errors import OutOfMemoryError
from captum_mllm.methods import ExactShapleyValues
from captum_mllm.testing import tiny_hf_adapter

CHAT = Chat().system("You are a helpful assistant.").user("Tell me a story about a cat by the sea")
TARGET = "A spider has eight legs"


def explain(model, ppe: int = 16):
    inp = ChatInput(CHAT, model)
    attr = MultimodalLLMAttribution(ShapleyValueSampling(model), model)
    torch.manual_seed(0)
    return attr.attribute(inp, target=TARGET, n_samples=3, perturbations_per_eval=ppe)


def failing_above(model, limit: int, error: Exception):
    """Make the model run out of memory on batches of more than ``limit`` coalitions."""
    score = model.score_masked
    sizes: list[int] = []

    def score_masked(masked, *args, **kwargs):
        sizes.append(len(masked))
        if len(masked) > limit:
            raise error
        return score(masked, *args, **kwargs)

    model.score_masked = score_masked
    return sizes


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"),
        MemoryError(),
    ],
)
def test_out_of_memory_halves_the_batch_and_changes_nothing(error: Exception) -> None:
    plain = explain(tiny_hf_adapter())
    model = tiny_hf_adapter()
    sizes = failing_above(model, 3, error)
    with pytest.warns(ResourceWarning, match="out of memory with 16 coalitions") as caught:
        res = explain(model)
    assert caught[0].filename == __file__  # the caller's line, not the library's
    # Batches of 16 failed, then 8 and 4, then 2 at a time from there on.
    assert max(sizes) == 16 and max(sizes[sizes.index(2) :]) <= 2
    assert res.provenance["memory_halvings"] == 3
    assert torch.equal(res.token_attr, plain.token_attr)
    assert torch.equal(res.seq_attr, plain.seq_attr)


def test_a_coalition_that_never_fits_raises_a_named_error_with_the_sizes() -> None:
    model = tiny_hf_adapter()
    failing_above(model, 0, torch.OutOfMemoryError("CUDA out of memory (injected)"))
    inp = ChatInput(CHAT, model)
    attr = MultimodalLLMAttribution(ExactShapleyValues(model), model)
    with pytest.warns(ResourceWarning), pytest.raises(OutOfMemoryError) as caught:
        attr.attribute(inp, target=TARGET, perturbations_per_eval=16)
    assert "of 10 features (batches of 16, 8, 4, 2, 1 coalitions tried)" in str(caught.value)


def test_other_runtime_errors_are_not_taken_for_memory() -> None:
    model = tiny_hf_adapter()
    failing_above(model, 0, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        explain(model)


def test_batches_respect_the_token_budget() -> None:
    plain = explain(tiny_hf_adapter(), ppe=64)
    model = tiny_hf_adapter()
    model.max_batch_tokens = 60
    widths: list[tuple[int, int]] = []
    score = model._score_rows

    def spy(rows, *args, **kwargs):
        leads = kwargs["prefix"].leads(rows)  # positions read from the cache are not pushed
        widths.append((len(rows), max(len(r) - n for r, n in zip(rows, leads, strict=True))))
        return score(rows, *args, **kwargs)

    model._score_rows = spy
    res = explain(model, ppe=64)
    # Rows after the cached positions plus the fed target: every call under 60 tokens.
    fed = len(model.tokenizer.encode(TARGET)) - 1
    assert all(n * (w + fed) <= 60 for n, w in widths), widths
    assert len(widths) > 3
    assert torch.equal(res.token_attr, plain.token_attr)
