"""Tiny offline models for tests, the demo and benchmarks.

Nothing here touches the network: tokenizers are trained locally with the
``tokenizers`` library on a built-in corpus and models are built from configs
with fixed seeds, so every run sees the same weights.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from captum_mllm.conformance import check_adapter
from captum_mllm.models.hf_causal import HFCausalLMAdapter

__all__ = [
    "check_adapter",
    "speech_like",
    "tiny_hf_adapter",
    "tiny_lfm2_audio",
    "tiny_wav2vec2_aligner",
]

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


def tiny_from_config(config_class: str, **sizes: Any) -> HFCausalLMAdapter:
    """A tiny random model of another architecture (GPT-2, OPT, BLOOM, ...)
    with :func:`tiny_tokenizer`, seeded, its weights larger than the default
    init's so that words matter.

    Args:
        config_class (str): a transformers config class, e.g. ``"GPT2Config"``.
        **sizes: the config's sizes (hidden width, heads, layers, ...).

    Returns:
        HFCausalLMAdapter: the model in eval mode, wrapped.
    """
    import transformers

    tokenizer = tiny_tokenizer()
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), initializer_range=0.2, **sizes
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    return HFCausalLMAdapter(model, tokenizer)


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


# LFM2-Audio -------------------------------------------------------------------------

# Control-token ids of LFM2-Audio's tokenizer (DESIGN.md, "LFM2-Audio facts").
LFM2_CONTROL_TOKENS = {
    0: "<|pad|>",
    1: "<|startoftext|>",
    2: "<|endoftext|>",
    6: "<|im_start|>",
    7: "<|im_end|>",
    128: "<|audio_start|>",
    130: "<|text_end|>",
}


def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (as ByteLevel uses)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars), strict=True))


@functools.lru_cache(maxsize=1)
def tiny_lfm2_tokenizer_dir(words: Sequence[str] = (), path: str | None = None) -> str:
    """Save a byte-level tokenizer laid out like LFM2's: control tokens at ids
    0..255 (the real ones at their ids), the 256 bytes at 256..511, then one
    token for each of ``words`` (alone and after a space).

    Args:
        words (sequence of str, optional): whole-word tokens to add. Default: none
        path (str, optional): the folder to write. Default: a new temporary one

    Returns:
        str: the folder, which ``AutoTokenizer.from_pretrained`` reads.
    """
    import tempfile

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = [LFM2_CONTROL_TOKENS.get(i, f"<|reserved_{i}|>") for i in range(256)]
    vocab = {name: i for i, name in enumerate(names)}
    to_char = _byte_to_char()
    vocab.update({c: 256 + b for b, c in to_char.items()})
    for word in words:  # a pre-token found whole in the vocabulary is one token
        for spelled in (word, " " + word):
            vocab.setdefault("".join(to_char[b] for b in spelled.encode()), len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
    )
    path = path or tempfile.mkdtemp(prefix="captum_mllm_lfm2_tok_")
    fast.save_pretrained(path)
    return path


#: The tiny LFM2-Audio of DESIGN.md, in liquid-audio's ``config.json`` layout.
TINY_LFM2_AUDIO: dict[str, Any] = dict(
    architectures=["LFM2AudioModel"], codebooks=8, tie_audio_embeddings=False,
    semantic_codebook_factor=100.0, codebook_weight="log", interleaved_n_text=6,
    interleaved_n_audio=12,
    preprocessor=dict(
        sample_rate=16000, normalize="per_feature", window_size=0.025, window_stride=0.01,
        window="hann", features=128, n_fft=512, log=True, frame_splicing=1, dither=0.0,
        pad_to=0, pad_value=0.0,
    ),
    encoder=dict(
        feat_in=128, feat_out=-1, n_layers=1, d_model=32, subsampling="dw_striding",
        subsampling_factor=8, subsampling_conv_channels=16, causal_downsampling=False,
        reduction=None, reduction_position=None, reduction_factor=1, ff_expansion_factor=2,
        self_attention_model="rel_pos", n_heads=2, att_context_size=[[-1, -1]], xscaling=False,
        untie_biases=True, pos_emb_max_len=5000, conv_kernel_size=9, conv_norm_type="batch_norm",
        conv_context_size=None, dropout=0.0, dropout_pre_encoder=0.0, dropout_emb=0.0,
        dropout_att=0.0,
    ),
    lfm=dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        layer_types=["conv", "full_attention"], num_attention_heads=4, num_key_value_heads=2,
        conv_L_cache=3, tie_word_embeddings=True, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=7, initializer_range=0.2,
    ),
    depthformer=dict(layers=1, dim=64, tie=True),
)  # fmt: skip


def lfm2_audio_config(**overrides: dict[str, Any]) -> dict[str, Any]:
    """:data:`TINY_LFM2_AUDIO` with some fields of its parts replaced, e.g.
    ``lfm2_audio_config(lfm={"hidden_size": 128})``."""
    return {k: {**v, **overrides.get(k, {})} if isinstance(v, dict) else v
            for k, v in TINY_LFM2_AUDIO.items()}  # fmt: skip


def lfm2_audio_from_config(
    config: dict[str, Any], tokenizer_dir: str, seed: int = 0
) -> tuple[Any, Any]:
    """A randomly initialised LFM2AudioModel of ``config`` (liquid-audio's
    ``config.json`` layout) and its processor with the tokenizer in ``tokenizer_dir``."""
    from liquid_audio import LFM2AudioModel, LFM2AudioProcessor
    from liquid_audio.model.conformer.encoder import ConformerEncoderConfig
    from liquid_audio.model.lfm2_audio import DepthformerConfig, LFM2AudioConfig
    from liquid_audio.processor import PreprocessorConfig
    from transformers import Lfm2Config

    pre = PreprocessorConfig(**config["preprocessor"])
    conf = LFM2AudioConfig(
        **{
            **config,
            "preprocessor": pre,
            "encoder": ConformerEncoderConfig(**config["encoder"]),
            "lfm": Lfm2Config(**config["lfm"]),
            "depthformer": DepthformerConfig(**config["depthformer"]),
        }
    )
    torch.manual_seed(seed)
    model = LFM2AudioModel(conf).eval()
    return model, LFM2AudioProcessor(tokenizer_dir, pre).eval()


def tiny_lfm2_audio(
    seed: int = 0,
    lfm: dict[str, Any] | None = None,
    encoder: dict[str, Any] | None = None,
    depthformer: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """A randomly initialised ~3.4M-parameter LFM2-Audio and its processor.

    Configuration from DESIGN.md (:data:`TINY_LFM2_AUDIO`): Lfm2 (vocab 512,
    hidden 64, 2 layers conv + full attention), a one-layer conformer (d_model
    32, 8x subsampling: one position per 80 ms), a one-layer depthformer (dim
    64), 8 codebooks. The overrides build other shapes of the same architecture
    (``benchmarks/gpu.py`` builds one of LFM2-Audio-1.5B's shape).

    Args:
        seed (int, optional): weight seed. Default: 0
        lfm (dict, optional): ``Lfm2Config`` fields to override. Default: None
        encoder (dict, optional): ``ConformerEncoderConfig`` fields to override. Default: None
        depthformer (dict, optional): ``DepthformerConfig`` fields to override. Default: None

    Returns:
        tuple: ``(LFM2AudioModel in eval mode, LFM2AudioProcessor)`` on CPU, float32.
    """
    import tempfile

    config = lfm2_audio_config(lfm=lfm or {}, encoder=encoder or {}, depthformer=depthformer or {})
    # The processor reads its tokenizer files when built: the folder goes with this call
    with tempfile.TemporaryDirectory(prefix="captum_mllm_lfm2_tok_") as folder:
        return lfm2_audio_from_config(config, tiny_lfm2_tokenizer_dir(path=folder), seed)


def speech_like(seconds: float = 1.5, sample_rate: int = 16000, seed: int = 0) -> torch.Tensor:
    """Synthetic speech-like audio: voiced syllables (harmonics under an
    envelope) separated by short pauses. Mono float32 ``(n_samples,)``."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    syllable = 0.25  # seconds, with a 0.05 s pause after each
    phase = (t % (syllable + 0.05)) / syllable
    envelope = torch.where(phase < 1, torch.sin(torch.pi * phase.clamp(max=1)) ** 2, 0.0)
    pitch = 110 + 40 * torch.rand(int(seconds / syllable) + 2, generator=g)
    f0 = pitch[(t // (syllable + 0.05)).long()]
    voiced = sum(torch.sin(2 * torch.pi * k * f0 * t) / k for k in range(1, 6))
    noise = 0.02 * torch.randn(t.shape, generator=g)
    return (0.3 * envelope * voiced + noise).float()


def tiny_wav2vec2_aligner(seed: int = 0, letters: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ'") -> Any:
    """A randomly initialised tiny ``Wav2Vec2ForCTC`` with a vocabulary of
    ``letters``, wrapped in a :class:`~captum_mllm.audio.ForcedAligner` (for tests).

    Returns:
        ForcedAligner: alignment runs end to end; its spans are meaningless.
    """
    import json
    import tempfile

    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    from captum_mllm.audio import ForcedAligner

    vocab = ["<pad>", "<s>", "</s>", "<unk>", "|", *letters]
    with tempfile.TemporaryDirectory(prefix="captum_mllm_w2v_") as folder:  # read when built
        with open(f"{folder}/vocab.json", "w", encoding="utf-8") as f:
            json.dump({c: i for i, c in enumerate(vocab)}, f)
        tokenizer = Wav2Vec2CTCTokenizer(f"{folder}/vocab.json", word_delimiter_token="|")
    extractor = Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True)
    config = Wav2Vec2Config(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, pad_token_id=0,
    )  # fmt: skip  # 1.25 ms emission frames (wav2vec2-base: 20 ms); fine for tests
    torch.manual_seed(seed)
    model = Wav2Vec2ForCTC(config)
    return ForcedAligner(model, Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer))
