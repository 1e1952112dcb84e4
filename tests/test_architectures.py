"""The Hugging Face adapter on the decoder families users load: attention
variants (sliding windows, ALiBi, learned and offset positions, logit
softcapping, mixtures of experts), pure state-space models and hybrids of the
two. Each tiny random model passes ``check_adapter``: batched, packed and
per-step scoring, prefix reuse and generation all give one coalition's values."""

import warnings

import pytest
import torch
import transformers
from captum.attr import FeatureAblation, LLMAttribution, TextTemplateInput

from captum_mllm import (
    AttentionAttribution,
    Chat,
    ChatInput,
    HFCausalLMAdapter,
    MultimodalLLMAttribution,
)
from captum_mllm.errors import InvalidModelError, UnsupportedInputError
from captum_mllm.testing import check_adapter, tiny_tokenizer

CHAT = Chat().system("You are a helpful assistant.").user("Who are you, my friend?")
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2}
SSM2 = {"mamba_n_heads": 8, "mamba_d_head": 16, "mamba_n_groups": 1, "mamba_d_state": 16}

# name: (config keywords, whether prefix reuse is kept). A model whose cached
# continuation differs from its whole forward is scored without prefix reuse:
# Mamba refuses the cache's longer mask, Jamba and Bamba restart their
# recurrent state on a multi-token input.
ARCHITECTURES = {
    "Qwen3": ({**SMALL, **HEADS, "head_dim": 16}, True),
    "Mistral": ({**SMALL, **HEADS, "sliding_window": 8}, True),
    "Gemma2": ({**SMALL, **HEADS, "head_dim": 16, "sliding_window": 8}, True),
    "Gemma3Text": ({**SMALL, **HEADS, "head_dim": 16, "sliding_window": 8}, True),
    "GPT2": ({"n_embd": 64, "n_layer": 2, "n_head": 4}, True),
    "OPT": ({**SMALL, "num_attention_heads": 4, "ffn_dim": 128, "word_embed_proj_dim": 64}, True),
    "Bloom": ({"hidden_size": 64, "n_layer": 2, "n_head": 4}, True),
    "Phi3": ({**SMALL, **HEADS, "pad_token_id": 0}, True),
    "Qwen3Moe": (
        {
            **SMALL,
            **HEADS,
            "head_dim": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
        },
        True,
    ),
    # Routers that subclass nn.Linear and return tuples (generation pads Linear rows)
    "Llama4Text": (
        {
            **SMALL,
            **HEADS,
            "head_dim": 16,
            "intermediate_size_mlp": 128,
            "num_local_experts": 4,
            "num_experts_per_tok": 1,
        },
        True,
    ),
    "Phimoe": ({**SMALL, **HEADS, "num_local_experts": 4, "num_experts_per_tok": 2}, True),
    "Lfm2": ({**SMALL, **HEADS, "layer_types": ["conv", "full_attention"]}, True),
    "Lfm2Moe": (
        {
            **SMALL,
            **HEADS,
            "num_hidden_layers": 3,
            "layer_types": ["conv", "full_attention", "conv"],
            "moe_intermediate_size": 32,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "num_dense_layers": 1,
        },
        True,
    ),
    "Mamba": ({"hidden_size": 64, "num_hidden_layers": 2}, False),
    "Mamba2": (
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_heads": 8,
            "head_dim": 16,
            "n_groups": 1,
            "state_size": 16,
        },
        True,
    ),
    "Jamba": (
        {
            **SMALL,
            **HEADS,
            "num_experts": 2,
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
            "mamba_d_state": 8,
        },
        False,
    ),
    "Bamba": ({**SMALL, **HEADS, **SSM2, "attn_layer_indices": [1]}, False),
    "FalconH1": ({**SMALL, **HEADS, **SSM2, "mamba_d_ssm": 128}, True),
    "Qwen3Next": (
        {
            **SMALL,
            **HEADS,
            "head_dim": 16,
            "layer_types": ["linear_attention", "full_attention"],
            "linear_num_value_heads": 4,
            "linear_num_key_heads": 2,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "num_experts": 2,
            "num_experts_per_tok": 1,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
        },
        True,
    ),
}


def tiny(name: str, **config: object) -> torch.nn.Module:
    config_class = getattr(transformers, f"{name}Config")
    model_class = getattr(transformers, f"{name.removesuffix('Text')}ForCausalLM", None)
    model_class = model_class or getattr(transformers, f"{name}LMHeadModel")  # GPT-2, BERT
    torch.manual_seed(0)
    vocab = len(tiny_tokenizer())
    return model_class(config_class(vocab_size=vocab, initializer_range=0.2, **config)).eval()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_each_decoder_family_keeps_the_adapter_contract(name):
    config, reuses = ARCHITECTURES[name]
    ran = check_adapter(HFCausalLMAdapter(tiny(name, **config), tiny_tokenizer()), CHAT)
    assert {"batched scoring", "per-step scoring", "batched generation"} <= set(ran)
    assert ("prefix reuse" in ran) == reuses


def test_attention_attributions_name_what_a_state_space_model_mixes_unseen():
    for name in ("Jamba", "Qwen3Next"):  # one attention layer, one recurrent
        model = HFCausalLMAdapter(tiny(name, **ARCHITECTURES[name][0]), tiny_tokenizer())
        with pytest.warns(UserWarning, match="linear_attention layers mix positions"):
            res = AttentionAttribution(model).attribute(ChatInput(CHAT, model), target=" yes")
        assert res.token_attr.shape[1] == 5
    mamba = HFCausalLMAdapter(tiny("Mamba", **ARCHITECTURES["Mamba"][0]), tiny_tokenizer())
    with pytest.raises(InvalidModelError, match="MambaForCausalLM returns no attention"):
        AttentionAttribution(mamba).attribute(ChatInput(CHAT, mamba), target=" yes")
    gemma = HFCausalLMAdapter(tiny("Gemma2", **ARCHITECTURES["Gemma2"][0]), tiny_tokenizer())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sliding-window attention is attention
        AttentionAttribution(gemma).attribute(ChatInput(CHAT, gemma), target=" yes")


def test_a_chat_past_a_learned_position_table_is_refused_by_name():
    """GPT-2 reads no position past its table: a longer chat raised a bare
    IndexError from inside its forward."""
    table = tiny("GPT2", n_embd=64, n_layer=2, n_head=4, n_positions=64)
    gpt2 = HFCausalLMAdapter(table, tiny_tokenizer())
    long = ChatInput(Chat().user(" ".join(["the quick brown fox jumps"] * 12)), gpt2)
    attr = MultimodalLLMAttribution(FeatureAblation(gpt2), gpt2)
    for target, gen_args in ((" yes", None), (None, {"max_new_tokens": 4})):
        with pytest.raises(UnsupportedInputError, match="64 positions GPT2LMHeadModel has"):
            attr.attribute(long, target=target, gen_args=gen_args)
    short = ChatInput(Chat().user("the quick brown fox jumps"), gpt2)
    assert attr.attribute(short, target=" yes").seq_attr.shape == (5,)
    from captum_mllm import ContrastiveTarget

    foil = ContrastiveTarget(" no" * 60)  # a foil past the table, so too
    with pytest.raises(UnsupportedInputError, match="64 positions GPT2LMHeadModel has"):
        MultimodalLLMAttribution(FeatureAblation(gpt2), gpt2, target=foil).attribute(
            short, target=" yes"
        )
    opt = HFCausalLMAdapter(tiny("OPT", **ARCHITECTURES["OPT"][0]), tiny_tokenizer())
    assert opt.position_table == opt.model.config.max_position_embeddings  # less its offset
    rotary = HFCausalLMAdapter(tiny("Qwen3", **ARCHITECTURES["Qwen3"][0]), tiny_tokenizer())
    assert rotary.position_table is None


@pytest.mark.parametrize("name", ["Qwen3", "Jamba"])
def test_check_adapter_holds_a_bfloat16_model_to_its_rounding(name):
    """A bfloat16 model's prefix-reused scores differ by its rounding (3e-2):
    check_adapter failed it at float32's 1e-4. Jamba's restarted state is still
    caught by the probe, not reused."""
    config, reuses = ARCHITECTURES[name]
    model = HFCausalLMAdapter(tiny(name, **config).to(torch.bfloat16), tiny_tokenizer())
    assert ("prefix reuse" in check_adapter(model, CHAT)) == reuses


def test_a_vision_language_model_explains_text_chats_and_an_encoder_decoder_is_refused():
    """Gemma 3 (4B and up) loads as an image-text model: its text path keeps the
    contract. T5 used to fail inside generation ("decoder_start_token_id")."""
    vocab = len(tiny_tokenizer())
    text = {**SMALL, **HEADS, "head_dim": 16, "vocab_size": vocab, "initializer_range": 0.2}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 28, "patch_size": 14}  # fmt: skip
    torch.manual_seed(0)
    config = transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4,
        image_token_index=vocab - 1, boi_token_index=vocab - 2, eoi_token_index=vocab - 3,
    )  # fmt: skip
    gemma3 = transformers.Gemma3ForConditionalGeneration(config).eval()
    assert "prefix reuse" in check_adapter(HFCausalLMAdapter(gemma3, tiny_tokenizer()), CHAT)
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=vocab, d_model=64, d_ff=128, num_layers=2, num_heads=4)
    )
    with pytest.raises(InvalidModelError, match="T5ForConditionalGeneration is an encoder-dec"):
        HFCausalLMAdapter(t5, tiny_tokenizer())


def test_from_pretrained_loads_a_vision_language_model_without_a_causal_lm_class(tmp_path):
    """Qwen2-VL, Qwen2.5-VL and Llava have no AutoModelForCausalLM class:
    from_pretrained raised "Unrecognized configuration class"."""
    vocab = len(tiny_tokenizer())
    text = {**SMALL, **HEADS, "vocab_size": vocab, "initializer_range": 0.2,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}  # fmt: skip
    vision = {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2}
    config = transformers.Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=vocab - 1,
        video_token_id=vocab - 2, vision_start_token_id=vocab - 3,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen2VLForConditionalGeneration(config).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model = HFCausalLMAdapter.from_pretrained(str(tmp_path), device="cpu")
    assert type(model.model).__name__ == "Qwen2VLForConditionalGeneration"
    # The model keeps rope_deltas from its last generate, one row per row: after
    # a batched one (check_adapter's), the cached continuation of one row raised
    # in the probe, and prefix reuse was turned off for the adapter's life.
    attr = MultimodalLLMAttribution(FeatureAblation(model), model)
    reused = attr.attribute(ChatInput(CHAT, model), target=" yes")
    model.generate_masked(ChatInput(CHAT, model).to_model_input(torch.eye(5).bool()))
    after = attr.attribute(ChatInput(CHAT, model), target=" yes")
    plain = attr.attribute(ChatInput(CHAT, model), target=" yes", reuse_prefix=False)
    for res in (reused, after):
        torch.testing.assert_close(res.token_attr, plain.token_attr, atol=1e-5, rtol=0)
    fresh = HFCausalLMAdapter(model.model, model.tokenizer)  # probed after that generation
    assert "prefix reuse" in check_adapter(fresh, CHAT)


def test_a_bidirectional_lm_head_is_found_and_scored_token_by_token():
    """BERT's LM head without is_decoder reads every position: it was taken for
    causal (any transformers model was), so one forward of the whole answer let
    each answer position read the ones after it. Stock Captum's token path is
    the oracle (without its cache, which fails on transformers 5)."""
    bert = tiny("Bert", **SMALL, num_attention_heads=4)
    model = HFCausalLMAdapter(bert, tiny_tokenizer())
    dropping = tiny("Qwen3", **ARCHITECTURES["Qwen3"][0], attention_dropout=0.5).train()
    qwen3 = HFCausalLMAdapter(dropping, tiny_tokenizer())  # probed in eval mode, left in train
    assert not model.is_causal and qwen3.is_causal and dropping.training
    assert "prefix reuse" in check_adapter(qwen3, CHAT) and dropping.training  # run in eval
    assert "per-step scoring" not in check_adapter(model, CHAT)
    words = TextTemplateInput("{} is the capital of {}", values=["Paris", "France"])
    stock = LLMAttribution(FeatureAblation(bert), tiny_tokenizer()).attribute(
        words, target=" yes sir", use_cached_outputs=False
    )
    ours = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(words, " yes sir")
    torch.testing.assert_close(ours.token_attr, stock.token_attr, atol=1e-5, rtol=0)
    with pytest.warns(UserWarning, match="BertLMHeadModel reads later positions"):
        AttentionAttribution(model).attribute(ChatInput(CHAT, model), target=" yes")
