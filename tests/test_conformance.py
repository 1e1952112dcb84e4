"""The adapter contract: enforced methods, and check_adapter on both adapters."""

import pytest
import torch

from captum_mllm import Chat, HFCausalLMAdapter, LFM2AudioAdapter, ModelAdapter
from captum_mllm.errors import AdapterCheckError
from captum_mllm.testing import check_adapter, speech_like, tiny_hf_adapter, tiny_lfm2_audio

CHAT = Chat().system("You are a helpful assistant.").user("Who are you, my friend?")


def test_the_tiny_llama_adapter_passes():
    ran = check_adapter(tiny_hf_adapter(), CHAT)
    assert ran == [
        "position table",
        "drop",
        "batched scoring",
        "per-step scoring",
        "prefix reuse",
        "batched generation",
        "seeded sampling",
    ]
    check_adapter(tiny_hf_adapter(), CHAT, text_baseline="replace", text_unit="token")


def test_the_lfm2_audio_adapter_passes():
    lfm = LFM2AudioAdapter(*tiny_lfm2_audio())
    chat = Chat().system("Be brief.").user("What is it?", audio=speech_like(1.0), sample_rate=16000)
    ran = check_adapter(lfm, chat, gen_args={"output_modality": "text+audio", "max_new_tokens": 8})
    assert "batched generation" in ran and "seeded sampling" in ran
    assert "prefix reuse" in ran  # the hybrid conv + key/value cache, expanded by hand
    check_adapter(lfm, chat, audio_baseline="embedding", audio_unit=0.5)


def test_the_real_smollm2_adapter_passes(smol):
    check_adapter(smol, Chat().user("What is the capital of France?"), n_coalitions=3)


def test_a_missing_method_stops_the_class_at_instantiation():
    class Incomplete(ModelAdapter):
        def encode(self, chat):
            raise NotImplementedError

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()


class KeepsEverything(HFCausalLMAdapter):
    """A broken adapter: reads absent positions as if they were present."""

    def _coalition_rows(self, masked, prefix):
        start = prefix.length if prefix is not None else 0
        return [masked.encoded.input_ids[start:].to(self.device) for _ in range(len(masked))]


class ShiftsScores(HFCausalLMAdapter):
    """A broken adapter: a row's score depends on the batch it is in."""

    def _score_rows(self, rows, *args, **kwargs):
        return super()._score_rows(rows, *args, **kwargs) + 0.01 * len(rows)


class SharedRandomness(HFCausalLMAdapter):
    """A broken adapter: samples all rows from one generator."""

    def generate_masked(self, masked, seeds=None, **gen_args):
        if seeds is not None:
            torch.manual_seed(seeds[0])
        return super().generate_masked(masked, seeds=None, **gen_args)


@pytest.mark.parametrize(
    "broken, reason",
    [
        (KeepsEverything, "does not remove exactly"),
        (ShiftsScores, "batched scoring"),
        (SharedRandomness, "depends on the batch"),
    ],
)
def test_broken_adapters_fail(broken, reason):
    good = tiny_hf_adapter()
    with pytest.raises(AdapterCheckError, match=reason):
        check_adapter(broken(good.model, good.tokenizer), CHAT)
