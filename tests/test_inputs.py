import pytest
import torch

from captum_mllm import Chat, ChatInput
from captum_mllm.errors import (
    CaptumMLLMError,
    InvalidContentError,
    InvalidGroupsError,
    NoFeaturesError,
)


def test_word_features_skip_punctuation_and_template(model, chat):
    inp = ChatInput(chat, model)
    assert inp.values == ["Who", "are", "you", "my", "friend"]
    assert inp.to_tensor().shape == (1, 5)
    assert all(f.role == "user" and f.turn == 1 and f.modality == "text" for f in inp.features)
    # "friend" is split into several tokens by the tiny BPE: one feature covers them all.
    friend = inp.features[4].positions
    assert len(friend) > 1
    assert "".join(inp.encoded.tokens[p] for p in friend).strip() == "friend"
    # The system prompt is left untouched and becomes the reusable prefix.
    assert inp.prefix_len == min(inp.features[0].positions)


def test_token_and_turn_units(model, chat):
    tokens = ChatInput(chat, model, text_unit="token")
    assert len(tokens.values) > 5
    assert "," not in tokens.values and "?" not in tokens.values
    keep_punct = ChatInput(chat, model, text_unit="token", skip=("special",))
    assert "," in keep_punct.values
    turns = ChatInput(chat, model, roles=("system", "user"), text_unit="turn")
    assert turns.values == ["[system 0]", "[user 1]"]
    # A turn feature covers its template tokens too: dropping it removes the message.
    enc = turns.encoded
    masked = turns.to_model_input(torch.tensor([[0.0, 1.0]]))
    kept = enc.input_ids[masked.present[0]]
    text = model.tokenizer.decode(kept)
    assert "system" not in text and "helpful" not in text and "friend" in text


def test_drop_removes_exactly_the_feature_positions(model, chat):
    inp = ChatInput(chat, model)
    coalitions = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    masked = inp.to_model_input(coalitions)
    assert masked.present.shape == (3, len(inp.encoded))
    dropped = set(inp.features[1].positions) | set(inp.features[4].positions)
    assert set((~masked.present[0]).nonzero().flatten().tolist()) == dropped
    assert bool(masked.present[1].all())
    rows = masked.rows()
    assert len(rows[0]) == len(inp.encoded) - len(dropped)
    assert model.tokenizer.decode(rows[0]).count("are") == 1  # only the system prompt's


def test_replace_baseline_keeps_length(model, chat):
    inp = ChatInput(chat, model, text_baseline="replace")
    masked = inp.to_model_input(torch.tensor([[0, 1, 1, 1, 1]]))
    row = masked.rows()[0]
    assert len(row) == len(inp.encoded)
    assert (row == model.tokenizer.pad_token_id).sum() == len(inp.features[0].positions)
    by_token = ChatInput(chat, model, text_baseline="<|im_start|>")
    assert by_token.replace_id == model.tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_groups_merge_features(model, chat):
    inp = ChatInput(chat, model, groups=["q", "q", "q", "f", "f"])
    assert inp.values == ["Who are you", "my friend"]
    assert inp.features[0].positions == tuple(
        sorted(p for f in ChatInput(chat, model).features[:3] for p in f.positions)
    )
    with pytest.raises(InvalidGroupsError):
        ChatInput(chat, model, groups=[0, 1])


def test_messages_accepted_and_errors(model):
    inp = ChatInput([{"role": "user", "content": "Who are you?"}], model)
    assert inp.values == ["Who", "are", "you"]
    with pytest.raises(NoFeaturesError):
        ChatInput(Chat().user("?!"), model)
    with pytest.raises(NoFeaturesError):
        ChatInput(Chat().system("Be brief."), model)  # no user turn
    with pytest.raises(CaptumMLLMError):
        ChatInput(Chat().user("hi"), model, text_unit="sentence")
    with pytest.raises(CaptumMLLMError):
        ChatInput(Chat().user("hi"), model, roles=("robot",))
    with pytest.raises(InvalidContentError):
        ChatInput(Chat().user("hi", audio=torch.zeros(1600), sample_rate=16000), model)
