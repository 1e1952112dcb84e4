"""SDPA's math kernel without its fully-masked-row pass: the same values to the
bit, used wherever a deterministic adapter asks for the math kernel, and the
transformers registry left as it was."""

from __future__ import annotations

import pytest
import torch
from conftest import adapter_and_input
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from captum_mllm.models import math_attention as ma


class Layer(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def padded_causal_mask(batch: int, length: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """(B, 1, L, S): queries are the last L of S positions; rows right-padded."""
    lens = torch.randint(width - length + 1, width + 1, (batch,), generator=gen)
    keys = torch.arange(width)[None] < lens[:, None]
    causal = torch.arange(length)[:, None] + (width - length) >= torch.arange(width)[None]
    return (keys[:, None, :] & causal[None])[:, None]


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "length", "width", "dim"),
    [
        (32, 4, 2, 78, 111, 16),  # grouped query heads: one product per key/value head
        (16, 9, 3, 30, 50, 64),
        (4, 9, 3, 33, 33, 64),
        (6, 4, 2, 12, 20, 16),  # under 16 queries: keys and values copied per head
        (5, 4, 2, 3, 9, 16),  # (grouped, 3 queries would round another way)
        (3, 2, 2, 7, 9, 8),
    ],
)
@pytest.mark.parametrize("mask_kind", ["padded", "none", "additive", "per head", "one query"])
def test_the_same_values_as_the_math_kernel_to_the_bit(
    batch, heads, kv_heads, length, width, dim, mask_kind
):
    gen = torch.Generator().manual_seed(batch + width)
    if mask_kind == "one query":
        length = 1
    q = torch.randn(batch, heads, length, dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads, width, dim, generator=gen) for _ in range(2))
    mask = None if mask_kind == "none" else padded_causal_mask(batch, length, width, gen)
    if mask_kind == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    if mask_kind == "per head":  # a bias per head: no grouping
        bias = torch.randn(batch, heads, length, width, generator=gen)
        mask = bias.masked_fill(~mask, float("-inf"))
    layer = Layer(heads // kv_heads)
    with sdpa_kernel(SDPBackend.MATH):
        expected, _ = sdpa_attention_forward(layer, q, k, v, mask, scaling=dim**-0.5)
    got, weights = ma.math_attention_forward(layer, q, k, v, mask, scaling=dim**-0.5)
    assert weights is None
    assert got.shape == expected.shape == (batch, length, heads, dim)
    assert torch.equal(got, expected), (got - expected).abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_get_the_math_kernels_values(dtype):
    """On a CPU the kernel computes half precision in float32: those go to it."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(4, 4, 20, 16, generator=gen).to(dtype)
    k, v = (torch.randn(4, 2, 30, 16, generator=gen).to(dtype) for _ in range(2))
    mask = padded_causal_mask(4, 20, 30, gen)
    with sdpa_kernel(SDPBackend.MATH):
        expected, _ = sdpa_attention_forward(Layer(2), q, k, v, mask)
    assert torch.equal(ma.math_attention_forward(Layer(2), q, k, v, mask)[0], expected)


def test_key_heads_are_read_off_the_keys_not_the_layer():
    """A latent-attention layer (GLM-4 Lite's, Kimi's) hands over keys of every
    head while its config counts fewer: the layer's groups raised a size error."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 20, 16, generator=gen) for _ in range(3))
    mask = padded_causal_mask(3, 20, 20, gen)
    with sdpa_kernel(SDPBackend.MATH):
        expected, _ = sdpa_attention_forward(Layer(1), q, k, v, mask)
    assert torch.equal(ma.math_attention_forward(Layer(2), q, k, v, mask)[0], expected)


def test_a_row_that_masks_every_key_comes_out_finite():
    """Only padding masks every key; the math kernel gives it zeros, ours a
    finite average: the other rows are the same to the bit."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=gen) for _ in range(3))
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    mask[1, :, 3] = False  # one query of the second row sees nothing
    with sdpa_kernel(SDPBackend.MATH):
        expected, _ = sdpa_attention_forward(Layer(1), q, k, v, mask)
    got, _ = ma.math_attention_forward(Layer(1), q, k, v, mask)
    assert torch.isfinite(got).all()
    seen = torch.ones(2, 5, dtype=torch.bool)
    seen[1, 3] = False
    assert torch.equal(got[seen], expected[seen])


def test_the_registry_is_restored_even_after_an_error():
    before = AttentionInterface._global_mapping["sdpa"]
    with pytest.raises(RuntimeError), ma.math_attention():
        assert AttentionInterface._global_mapping["sdpa"] is ma.math_attention_forward
        with ma.math_attention():  # nested: the outer one still holds after
            pass
        assert AttentionInterface._global_mapping["sdpa"] is ma.math_attention_forward
        raise RuntimeError
    assert AttentionInterface._global_mapping["sdpa"] is before


@pytest.mark.parametrize("speech", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_adapters_score_and_generate_through_it(speech, deterministic, monkeypatch):
    """The padded forwards of scoring, generation and hidden states go through
    it when deterministic (and never otherwise); the values are the math
    kernel's to the bit."""
    model, inp = adapter_and_input(speech, deterministic)
    masked = inp.to_model_input(torch.randint(0, 2, (4, inp.n_itp_features)))
    response = model.check_target(torch.arange(5, 9))
    prefix = model.prefill(masked)
    calls: list[int] = []
    ours = ma.math_attention_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return ours(*args, **kwargs)

    def run():
        scores = model.score_masked(masked, response, prefix)
        answers = model.generate_masked(masked, max_new_tokens=3)
        return scores, [a.ids for a in answers], model.response_states(answers, inp.encoded)

    monkeypatch.setattr(ma, "math_attention_forward", spy)
    got = run()
    assert bool(calls) == deterministic
    if deterministic:
        monkeypatch.setattr(ma, "math_attention_forward", sdpa_attention_forward)
        expected = run()  # the math kernel itself
        assert torch.equal(got[0], expected[0])
        assert all(torch.equal(a, b) for a, b in zip(got[1], expected[1], strict=True))
        assert all(torch.equal(a, b) for a, b in zip(got[2], expected[2], strict=True))


ARCHITECTURES = {  # tiny random models from configs: no download
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3 (query/key norms)": ("Qwen3Config", {"head_dim": 16}),
    "mistral (sliding window)": ("MistralConfig", {"sliding_window": 8}),
    "gemma3 (sliding, own scaling)": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 8}),
    "gpt-neox (no grouped heads)": ("GPTNeoXConfig", {"num_key_value_heads": 4}),
}


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hugging_face_architectures_get_the_math_kernels_logits(arch, padded):
    """Through transformers' own attention modules and masks (sliding windows,
    query/key norms, grouped heads or not), padded or causal without a mask."""
    import transformers

    name, extra = ARCHITECTURES[arch]
    sizes = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    config = getattr(transformers, name)(**{**sizes, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    ids = torch.randint(3, 128, (3, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 24, dtype=torch.long)
    if padded:
        mask[1, 17:] = 0
        mask[2, 5:] = 0
    kwargs = {"attention_mask": mask} if padded else {}
    calls: list[int] = []
    ours = ma.math_attention_forward
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.MATH):
            expected = model(input_ids=ids, **kwargs).logits
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(
                ma, "math_attention_forward", lambda *a, **k: calls.append(1) or ours(*a, **k)
            )
            with ma.math_attention():
                got = model(input_ids=ids, **kwargs).logits
    assert len(calls) == config.num_hidden_layers
    real = mask.bool()
    assert torch.equal(got[real], expected[real]), (got[real] - expected[real]).abs().max()
