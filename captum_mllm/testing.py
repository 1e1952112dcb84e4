"""Tiny offline models for tests, the demo and benchmarks.

Nothing here touches the network: tokenizers are trained locally with the
``tokenizers`` library on a built-in corpus and models are built from configs
with fixed seeds, so every run sees the same weights.
"""

from __future__ import annotations

import functools

import torch

from captum_mllm.models.hf_causal import HFCausalLMAdapter

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = """\
You are a helpful assistant. Answer briefly and politely.
Who are you? I am a small language model made for tests.
What is the capital of France? The capital of France is Paris.
The quick brown fox jumps over the lazy dog near the river bank.
Please explain why the sky is blue in one short sentence.
Sunlight is scattered by the air, and blue light scatters the most.
How many legs does a spider have? A spider has eight legs.
Tell me a story about a cat who lived in a lighthouse by the sea.
Numbers like 1, 2, 3 and 42 appear in text; so do commas, colons: and dots.
Can you translate good morning into French? Bonjour means good morning.
The weather today is sunny with a light breeze from the west.
Music, art and science help people understand the world around them.
"""


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 600):
    """A byte-level BPE tokenizer with a ChatML chat template.

    Its pre-tokenizer splits before spaces (GPT-2 style), so removing a word
    with its leading space removes exactly that word's tokens.

    Args:
        vocab_size (int, optional): BPE vocabulary size. Default: 600

    Returns:
        PreTrainedTokenizerFast: the tokenizer (pad ``<|endoftext|>``, eos ``<|im_end|>``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_llama(
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    initializer_range: float = 0.2,
) -> torch.nn.Module:
    """A randomly initialised Llama-style causal LM for :func:`tiny_tokenizer`.

    ``initializer_range`` is larger than usual so that the random model has
    confident, input-dependent predictions and attributions are not all ~0.

    Args:
        hidden_size (int, optional): width. Default: 64
        num_layers (int, optional): decoder layers. Default: 2
        seed (int, optional): weight seed. Default: 0
        initializer_range (float, optional): std of the weight init. Default: 0.2

    Returns:
        LlamaForCausalLM: in eval mode, float32, on CPU.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=initializer_range,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def tiny_hf_adapter(**kwargs: object) -> HFCausalLMAdapter:
    """:func:`tiny_llama` and :func:`tiny_tokenizer` wrapped in an adapter.

    Args:
        **kwargs: passed to :func:`tiny_llama`.

    Returns:
        HFCausalLMAdapter: ready for ``ChatInput`` and ``MultimodalLLMAttribution``.

    Examples::

        >>> from captum_mllm.testing import tiny_hf_adapter
        >>> model = tiny_hf_adapter()
    """
    return HFCausalLMAdapter(tiny_llama(**kwargs), tiny_tokenizer())  # type: ignore[arg-type]
