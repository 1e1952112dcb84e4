"""LFM2-Audio: mixed text + audio chats, audio baselines, batched generation
against liquid-audio's own generators, packed scoring, bad audio."""

import io
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
from captum.attr import FeatureAblation, ShapleyValues, ShapleyValueSampling
from conftest import brute_force_shapley, game

from captum_mllm import Chat, ChatInput, LFM2AudioAdapter, LogProbTarget, MultimodalLLMAttribution
from captum_mllm.errors import (
    AlignmentError,
    AudioError,
    InvalidBaselineError,
    InvalidContentError,
    InvalidOptionError,
    InvalidRoleError,
    InvalidSpanError,
)
from captum_mllm.testing import speech_like, tiny_lfm2_audio


@pytest.fixture(scope="module")
def lfm():
    model, processor = tiny_lfm2_audio()
    return LFM2AudioAdapter(model, processor)


@pytest.fixture(scope="module")
def wave():
    return speech_like(1.0)


def test_the_tiny_test_models_leave_no_files_behind(tmp_path, monkeypatch, wave):
    """tiny_lfm2_audio and tiny_wav2vec2_aligner wrote their tokenizer files to a
    new temporary folder on every call and left it there: a test run left
    hundreds. The files are read when the tokenizers are built, then removed."""
    import tempfile

    from captum_mllm.testing import tiny_wav2vec2_aligner

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model, processor = tiny_lfm2_audio()
    aligner = tiny_wav2vec2_aligner()
    assert list(tmp_path.iterdir()) == []
    encoded = LFM2AudioAdapter(model, processor).encode(mixed_chat(wave))  # still usable
    system = processor.text_tokenizer.decode(encoded.input_ids[encoded.turn == 0])
    assert system == "<|im_start|>system\nBe brief.<|im_end|>\n"
    assert [w for _, _, w in aligner.align(wave, 16000, "what is it")] == ["what", "is", "it"]


def mixed_chat(wave, text="What is it?"):
    return Chat().system("Be brief.").user(text, audio=wave, sample_rate=16000)


def liquid_state(processor, wave, text="What is it?"):
    from liquid_audio import ChatState

    st = ChatState(processor, dtype=torch.float32)
    st.new_turn("system")
    st.add_text("Be brief.")
    st.end_turn()
    st.new_turn("user")
    st.add_audio(wave[None], 16000)
    st.add_text(text)
    st.end_turn()
    st.new_turn("assistant")
    return st


def as_rows(generator):
    """liquid-audio yields (1,) text tokens and (8,) frames -> (N, 9) items."""
    rows = [[int(t[0])] + [-1] * 8 if t.numel() == 1 else [-1, *t.tolist()] for t in generator]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 9)


def test_layout_matches_liquid_audio_chat_state(lfm, wave):
    enc = lfm.encode(mixed_chat(wave))
    st = liquid_state(lfm.processor, wave)
    text_ids = enc.input_ids[enc.input_ids >= 0]
    assert torch.equal(text_ids, st.text[0])
    from liquid_audio import LFMModality

    flags = torch.where(enc.clip >= 0, int(LFMModality.AUDIO_IN), int(LFMModality.TEXT))
    assert torch.equal(flags, st.modality_flag[0].cpu())
    with torch.no_grad():
        expected = lfm.model._prefill(**st)[0]
    torch.testing.assert_close(enc.state["embeds"], expected)


def test_turns_its_chat_format_cannot_hold_are_refused(lfm):
    """liquid-audio's ChatState has system, user and assistant turns of content
    alone: a tool turn, or a tool call, would be laid out as no model saw."""
    with pytest.raises(InvalidRoleError, match="in a user turn"):
        lfm.encode(Chat().user("Weather?").tool("Sunny."))
    call = {"type": "function", "function": {"name": "weather", "arguments": {}}}
    with pytest.raises(InvalidContentError, match=r"not \['tool_calls'\]"):
        lfm.encode(Chat().user("Weather?").assistant(tool_calls=[call]).user("And?"))
    with pytest.raises(InvalidContentError, match=r"not \['reasoning_content'\]"):
        ChatInput(Chat().user("Capital?").assistant("Paris.", reasoning_content="It is."), lfm)


@pytest.mark.parametrize("audio_baseline", ["drop", "embedding"])
def test_exact_shapley_brute_force_and_efficiency(lfm, wave, audio_baseline):
    inp = ChatInput(mixed_chat(wave), lfm, audio_unit=0.5, audio_baseline=audio_baseline)
    assert [f.modality for f in inp.features] == ["audio_in"] * 2 + ["text"] * 3
    res = MultimodalLLMAttribution(ShapleyValues(lfm), lfm).attribute(
        inp, gen_args={"max_new_tokens": 4}, perturbations_per_eval=32
    )
    value = game(LogProbTarget(), lfm, inp, res.target_ids)
    expected = brute_force_shapley(value, inp.n_itp_features)
    torch.testing.assert_close(res.token_attr, expected[1:], atol=2e-4, rtol=0)
    torch.testing.assert_close(res.seq_attr, expected[0], atol=2e-4, rtol=0)
    full, empty = value(torch.stack([torch.ones(5), torch.zeros(5)]))[:, 0]
    assert res.seq_attr.sum().item() == pytest.approx((full - empty).item(), abs=2e-4)
    assert res.seq_attr[:2].abs().max() > 1e-4  # the audio features matter


def test_batched_equals_unbatched_and_packed_equals_single(lfm, wave):
    inp = ChatInput(mixed_chat(wave), lfm, audio_unit="frame")
    attr = MultimodalLLMAttribution(ShapleyValueSampling(lfm), lfm)
    runs = []
    for ppe in (1, 32):
        torch.manual_seed(0)
        runs.append(
            attr.attribute(
                inp, gen_args={"max_new_tokens": 3}, n_samples=2, perturbations_per_eval=ppe
            )
        )
    torch.testing.assert_close(runs[0].token_attr, runs[1].token_attr, atol=1e-5, rtol=0)
    masks = (
        torch.rand(6, inp.n_itp_features, generator=torch.Generator().manual_seed(1)) > 0.5
    ).float()
    target = lfm.generate_masked(
        inp.to_model_input(), max_new_tokens=8, output_modality="text+audio"
    )[0]
    assert (target.ids[:, 0] < 0).any() and (target.ids[:, 0] >= 0).any()  # text and audio
    packed = lfm.score_masked(inp.to_model_input(masks), target)
    single = torch.cat([lfm.score_masked(inp.to_model_input(m[None]), target) for m in masks])
    torch.testing.assert_close(packed, single, atol=1e-4, rtol=0)
    by_step = lfm.score_masked(inp.to_model_input(masks), target, per_step=True)
    torch.testing.assert_close(packed, by_step, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["text+audio", "audio"])
def test_batched_generation_equals_liquid_audio(mode):
    model, processor = tiny_lfm2_audio()
    lfm = LFM2AudioAdapter(model, processor)
    waves = [speech_like(1.0, seed=s) for s in range(3)]
    texts = ["What is it?", "Hi", "Tell me more"]
    generate = model.generate_interleaved if mode == "text+audio" else model.generate_sequential
    if mode == "audio":  # make the random model start speaking at once
        with torch.no_grad():
            h = model.lfm(
                inputs_embeds=model._prefill(**liquid_state(processor, waves[0]))
            ).last_hidden_state[0, -1]
            model.lfm.embed_tokens.weight[128] = (
                3 * h / h.norm() * model.lfm.embed_tokens.weight.norm(dim=1).mean()
            )
    for w, t in zip(waves, texts, strict=True):
        ref = as_rows(generate(**liquid_state(processor, w, t), max_new_tokens=16))
        ours = lfm.generate_masked(
            ChatInput(mixed_chat(w, t), lfm).to_model_input(),
            max_new_tokens=16,
            output_modality=mode,
        )[0]
        assert torch.equal(ours.ids, ref)
        assert (ref[:, 0] < 0).any()  # the comparison covers audio frames
    inp = ChatInput(mixed_chat(waves[0]), lfm, audio_unit=0.5)
    masks = torch.tensor(
        [[1, 1, 1, 1, 1], [0, 1, 1, 0, 1], [1, 0, 0, 1, 0], [0, 0, 0, 0, 0]]
    ).float()
    batched = lfm.generate_masked(
        inp.to_model_input(masks), max_new_tokens=12, output_modality=mode
    )
    for m, row in zip(masks, batched, strict=True):
        assert torch.equal(
            row.ids,
            lfm.generate_masked(
                inp.to_model_input(m[None]), max_new_tokens=12, output_modality=mode
            )[0].ids,
        )
    labels = batched[0].labels
    assert "♪0.08s" in labels


def test_audio_output_is_attributed_per_frame(lfm, wave):
    inp = ChatInput(mixed_chat(wave), lfm, audio_unit=0.5)
    res = MultimodalLLMAttribution(ShapleyValues(lfm), lfm).attribute(
        inp,
        gen_args={"max_new_tokens": 9, "output_modality": "text+audio"},
        perturbations_per_eval=32,
    )
    assert res.target_ids.shape == (9, 9)
    assert res.token_attr.shape == (9, 5) and torch.isfinite(res.token_attr).all()
    assert res.output_tokens[6:] == ["♪0.08s", "♪0.16s", "♪0.24s"]
    assert res.output_audio["codes"].shape == (8, 3) and res.output_audio["waveform"] is None


def test_text_tokens_between_frames_are_labelled_as_captum_labels_them(lfm):
    """A character spelt in several byte tokens was labelled "�" on each."""
    from captum.attr._core.llm_attr import _convert_ids_to_pretty_tokens

    ids = lfm.tokenizer("東京 🗼", add_special_tokens=False).input_ids
    expected = _convert_ids_to_pretty_tokens(torch.tensor(ids), lfm.tokenizer)
    items = torch.full((len(ids) + 2, 9), -1, dtype=torch.long)
    items[[0, *range(3, len(ids) + 2)], 0] = torch.tensor(ids)  # two frames after the first
    items[1:3, 1:] = 0
    labels = lfm.response(items, waveform=False).labels
    assert labels[1:3] == ("♪0.08s", "♪0.16s")
    assert [x for x in labels if not x.startswith("♪")] == [t or "␣" for t in expected]


def test_spoken_answer_is_decoded_as_liquid_audio_decodes_it(lfm):
    """LFM2-Audio-1.5B ships Mimi alone: its answer's waveform came back None,
    without a word, as did one whose detokenizer failed (it moves to CUDA)."""
    import copy

    from liquid_audio.moshi.models.loaders import get_mimi

    codes = torch.randint(0, 2048, (8, 4), generator=torch.Generator().manual_seed(0))
    items = torch.cat([torch.full((4, 1), -1), codes.T], dim=1)
    processor = copy.copy(lfm.processor)
    processor.mimi_weights_path = "random Mimi weights"  # read through the property's cache
    processor._mimi = get_mimi(None, device="cpu").eval()
    spoken = LFM2AudioAdapter(lfm.model, processor)
    with torch.no_grad():  # liquid-audio's demo decodes this way
        want = processor._mimi.decode(codes[None])[0, 0]
    audio = spoken.response(items).audio
    assert audio["codes"].equal(codes) and audio["sample_rate"] == 24_000
    torch.testing.assert_close(audio["waveform"], want)
    processor.detokenizer_path = "/no/such/detokenizer"  # tried first, as liquid-audio's README
    with pytest.warns(UserWarning, match="by processor.mimi.decode instead"):
        torch.testing.assert_close(spoken.response(items).audio["waveform"], want)
    with warnings.catch_warnings():  # not retried: each try rebuilt the detokenizer
        warnings.simplefilter("error")
        torch.testing.assert_close(spoken.response(items).audio["waveform"], want)
    processor.mimi_weights_path = None
    spoken = LFM2AudioAdapter(lfm.model, processor)
    with pytest.warns(UserWarning, match="no waveform"):
        assert spoken.response(items).audio["waveform"] is None


def test_only_the_explained_answer_is_decoded_to_a_waveform(lfm, wave):
    """Each coalition's regenerated answer was decoded too: a decoder call per
    coalition, for waveforms nothing reads."""
    import copy

    from liquid_audio.moshi.models.loaders import get_mimi

    from captum_mllm import EmbeddingSimilarity

    processor = copy.copy(lfm.processor)
    processor.mimi_weights_path = "random Mimi weights"
    processor._mimi = mimi = get_mimi(None, device="cpu").eval()
    spoken = LFM2AudioAdapter(lfm.model, processor)
    decode, calls = mimi.decode, []
    mimi.decode = lambda codes: calls.append(codes) or decode(codes)
    gen = {"max_new_tokens": 9, "output_modality": "text+audio"}
    inp = ChatInput(mixed_chat(wave), spoken, audio_unit=0.5)
    for target, gen_args in ((EmbeddingSimilarity(gen_args=gen), None), (None, gen)):
        calls.clear()
        res = MultimodalLLMAttribution(FeatureAblation(spoken), spoken, target=target).attribute(
            inp, gen_args=gen_args
        )
        assert len(calls) == 1 and res.n_unique_coalitions > 1
        with torch.no_grad():
            want = decode(res.output_audio["codes"][None])[0, 0]
        torch.testing.assert_close(res.output_audio["waveform"], want)


def test_drop_removes_exactly_the_feature_positions(lfm, wave):
    inp = ChatInput(mixed_chat(wave), lfm, audio_unit=0.5)
    base = inp.encoded.state["embeds"]
    first_audio = inp.features[0]
    row = lfm.masked_inputs(inp.to_model_input(torch.tensor([[0.0, 1, 1, 1, 1]])))[0]
    keep = torch.ones(len(base), dtype=torch.bool)
    keep[list(first_audio.positions)] = False
    torch.testing.assert_close(row, base[keep])
    assert len(first_audio.positions) == 6  # 0.00-0.48 s: positions whose midpoint < 0.5 s
    assert first_audio.time == (0.0, 0.48)


def test_embedding_baseline_never_reencodes_and_silence_does(lfm, wave):
    chat = mixed_chat(wave)
    calls = lfm.n_encoder_calls
    inp = ChatInput(chat, lfm, audio_unit=0.25, audio_baseline="embedding")
    assert lfm.n_encoder_calls == calls + 1  # the clip, once per explanation
    MultimodalLLMAttribution(ShapleyValueSampling(lfm), lfm).attribute(
        inp, target="ok", n_samples=3
    )
    assert lfm.n_encoder_calls == calls + 1
    row = lfm.masked_inputs(inp.to_model_input(torch.tensor([[0.0] + [1.0] * 6])))[0]
    assert row.shape == inp.encoded.state["embeds"].shape
    assert row[list(inp.features[0].positions)].abs().sum() == 0

    silent = ChatInput(chat, lfm, audio_unit=0.25, audio_baseline="silence")
    calls = lfm.n_encoder_calls
    coalition = torch.tensor([[0.0, 1, 1, 1, 1, 1, 1]])
    row = lfm.masked_inputs(silent.to_model_input(coalition))[0]
    assert lfm.n_encoder_calls == calls + 1
    zeroed = wave.clone()
    t0, t1 = silent.features[0].time
    zeroed[round(t0 * 16000) : round(t1 * 16000)] = 0
    expected = lfm.encode(
        Chat().system("Be brief.").user("What is it?", audio=zeroed, sample_rate=16000)
    )
    torch.testing.assert_close(row, expected.state["embeds"])
    lfm.masked_inputs(silent.to_model_input(coalition))  # same silenced clip: cached
    assert lfm.n_encoder_calls == calls + 2  # (+1 for the expected chat above)


def test_audio_units_and_labels(lfm, wave):
    frames = ChatInput(mixed_chat(wave), lfm, audio_unit="frame", roles=("user",))
    assert frames.values[:2] == ["audio[0.00-0.08s]", "audio[0.08-0.16s]"]
    assert sum(f.modality == "audio_in" for f in frames.features) == 13  # ceil(101 / 8)
    whole = ChatInput(mixed_chat(wave), lfm, audio_unit="turn")
    assert whole.values[0] == "audio[0.00-1.00s]"
    spans = ChatInput(mixed_chat(wave), lfm, audio_unit=[(0.0, 0.4, "what"), (0.4, 0.7, "is")])
    assert spans.values[:2] == ["what", "is"] and spans.features[1].time == (0.4, 0.7)
    # Two clips: one list of spans was read as times in each clip; now one per clip
    two = mixed_chat(wave).user(audio=wave[:8000], sample_rate=16000)
    with pytest.raises(InvalidSpanError, match="one list of spans per clip"):
        ChatInput(two, lfm, audio_unit=[(0.0, 0.4, "what")])
    each = ChatInput(
        two, lfm, audio_unit=[[(0.0, 0.4, "what")], [(0.0, 0.3, "a"), (0.3, 0.5, "b")]]
    )
    audio = [f for f in each.features if f.modality == "audio_in"]
    assert [(f.label, f.clip) for f in audio] == [("what", 0), ("a", 1), ("b", 1)]
    assert [f.label for f in ChatInput(two, lfm, audio_unit=[[], [(0.0, 0.5, "b")]]).features
            if f.modality == "audio_in"] == ["b"]  # fmt: skip
    with pytest.raises(InvalidSpanError, match="2 lists of spans for 1 audio clips"):
        ChatInput(mixed_chat(wave), lfm, audio_unit=[[(0.0, 0.4)], [(0.0, 0.4)]])
    turns = ChatInput(mixed_chat(wave), lfm, text_unit="turn", roles=("system", "user"))
    assert [f.modality for f in turns.features] == ["text", "mixed"]
    with pytest.raises(InvalidOptionError):
        ChatInput(mixed_chat(wave), lfm, audio_unit="syllable")
    with pytest.raises(InvalidBaselineError):
        ChatInput(mixed_chat(wave), lfm, audio_baseline="noise")


def _wav_bytes(samples, rate=16000):
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV")
    return buf.getvalue()


def test_audio_inputs_are_read_mixed_and_resampled(lfm, tmp_path):
    stereo = np.stack([speech_like(0.5).numpy(), np.zeros(8000, dtype=np.float32)], axis=1)
    path = tmp_path / "clip.flac"
    sf.write(path, stereo, 16000)
    chat = Chat().user("Hi", audio=str(path))
    part = chat[0].parts[0]
    assert part.sample_rate == 16000 and part.waveform.shape == (8000,)
    torch.testing.assert_close(part.waveform, torch.from_numpy(stereo.mean(1)), atol=1e-4, rtol=0)
    at_8k = Chat().user("Hi", audio=_wav_bytes(speech_like(0.5, 8000).numpy(), 8000))
    enc = lfm.encode(at_8k)
    assert int((enc.clip >= 0).sum()) == 7  # 0.5 s at 16 kHz: ceil(51 / 8)


@pytest.mark.parametrize(
    "audio, rate",
    [
        (b"not a sound file", None),  # corrupt
        ("/nonexistent/clip.wav", None),  # unreadable
        (np.zeros(0, dtype=np.float32), 16000),  # empty
        (np.full(1600, np.nan, dtype=np.float32), 16000),  # all NaN
        (np.zeros(1600, dtype=np.float32), None),  # no sample rate
        (_wav_bytes(np.zeros(0, dtype=np.float32)), None),  # empty file
    ],
)
def test_bad_audio_raises(audio, rate):
    with pytest.raises(AudioError):
        Chat().user("Hi", audio=audio, sample_rate=rate)


def test_clip_shorter_than_one_position_raises(lfm):
    with pytest.raises(AudioError, match="80 ms"):
        lfm.encode(Chat().user("Hi", audio=np.zeros(800, dtype=np.float32), sample_rate=16000))


def test_word_features_from_forced_alignment(lfm):
    import soundfile as sf

    from captum_mllm.testing import tiny_wav2vec2_aligner

    path = "captum_mllm/data/question.wav"
    samples, rate = sf.read(path, dtype="float32")
    aligner = tiny_wav2vec2_aligner()
    transcript = "what is the capital of france"
    spans = aligner.align(torch.from_numpy(samples), rate, transcript)
    assert [w for _, _, w in spans] == transcript.split()
    starts = [s for s, _, _ in spans]
    ends = [e for _, e, _ in spans]
    assert starts == sorted(starts) and all(s <= e for s, e in zip(starts, ends, strict=True))
    assert ends[:-1] == starts[1:] and 0 <= starts[0] and ends[-1] <= len(samples) / rate + 1e-3
    chat = Chat().user("Answer.", audio=path)
    inp = ChatInput(chat, lfm, audio_unit="word", aligner=aligner, transcripts=transcript)
    audio_labels = [f.label for f in inp.features if f.modality == "audio_in"]
    # Every word is in exactly one feature, in order (too-short words merged).
    assert " ".join(audio_labels).split() == [f"♪{w}" for w in transcript.split()]
    with pytest.raises(AlignmentError):
        ChatInput(chat, lfm, audio_unit="word")


def test_boundaries_move_to_the_quietest_frame():
    wave = torch.ones(16000)
    wave[6000:6160] = 0.0  # 10 ms of silence at 0.375-0.385 s
    assert quietest_point_(wave, 0.2, 0.8) == pytest.approx(0.38, abs=0.006)
    assert quietest_point_(wave, 0.5, 0.501) == pytest.approx(0.5005)


def quietest_point_(wave, start, end):
    from captum_mllm.audio import quietest_point

    return quietest_point(wave, 16000, start, end)


def test_silence_cache_belongs_to_its_chat(lfm):
    """Two chats never share silenced encodings (the cache lives in each chat's state)."""
    first = ChatInput(
        mixed_chat(speech_like(0.5, seed=3)), lfm, audio_unit="turn", audio_baseline="silence"
    )
    second = ChatInput(
        mixed_chat(speech_like(0.5, seed=4)), lfm, audio_unit="turn", audio_baseline="silence"
    )
    coalition = torch.tensor([[0.0, 1, 1, 1]])
    calls = lfm.n_encoder_calls
    a = lfm.masked_inputs(first.to_model_input(coalition))[0]
    b = lfm.masked_inputs(second.to_model_input(coalition))[0]
    assert lfm.n_encoder_calls == calls + 2
    torch.testing.assert_close(a, b)  # both clips fully silenced: same encoding, computed twice
    assert "silenced" in first.encoded.state and "silenced" in second.encoded.state


def test_a_space_ending_one_part_stays_out_of_the_next_parts_word(lfm):
    inp = ChatInput(Chat().user(["Hi ", "there"]), lfm)
    hi, there = inp.features
    assert (hi.label, there.label) == ("Hi", "there")
    assert {int(inp.encoded.part[p]) for p in there.positions} == {1}


def test_a_span_too_short_for_a_position_merges_with_its_neighbour(lfm, wave):
    spans = [(0.0, 0.4, "what"), (0.4, 0.43, "of"), (0.43, 0.9, "is"), (0.9, 0.92, "it")]
    inp = ChatInput(mixed_chat(wave), lfm, audio_unit=spans)
    audio = [f for f in inp.features if f.modality == "audio_in"]
    # "of" (30 ms) holds no 80 ms position's middle: it joins "is".
    assert [f.label for f in audio] == ["what", "of is", "it"]
    assert audio[1].time == pytest.approx((0.4, 0.9))
    # At the clip's end a too-short span joins the one before it.
    tail = [(0.0, 0.5, "a"), (0.5, 0.96, "b"), (0.96, 0.97, "c")]
    ends = ChatInput(mixed_chat(wave), lfm, audio_unit=tail).features
    assert [f.label for f in ends if f.modality == "audio_in"] == ["a", "b c"]


@pytest.mark.parametrize(
    "spans",
    [
        [(0.5, 0.2, "reversed")],
        [(0.3, 0.3, "empty")],
        [(2.0, 3.0, "after the clip")],
        [(-0.2, 0.3)],
        [(0.0, 0.5, "a"), (0.3, 0.9, "b")],  # overlapping: positions went to the first silently
        [(0.3, 0.9, "b"), (0.0, 0.31, "a")],
    ],
)
def test_bad_spans_raise(lfm, wave, spans):
    with pytest.raises(InvalidSpanError):
        ChatInput(mixed_chat(wave), lfm, audio_unit=spans)


def test_a_group_across_audio_and_text_parts_is_a_node_of_its_own(lfm, wave):
    inp = ChatInput(mixed_chat(wave), lfm)
    n = inp.n_itp_features
    spans = [f for f in range(n) if inp.features[f].modality == "audio_in"]
    assert inp.feature_tree() == [spans, list(range(len(spans), n))]  # clip, then words
    grouped = ChatInput(mixed_chat(wave), lfm, groups=[*range(n - 1), 0])  # a span and "it"
    assert grouped.features[0].modality == "mixed"
    tree = grouped.feature_tree()  # it was inside the clip's node

    def leaves(node):
        return [node] if isinstance(node, int) else [x for child in node for x in leaves(child)]

    assert tree[0] == 0 and sorted(leaves(tree[1:])) == list(range(1, n - 1))


def test_transcripts_must_match_the_clips(lfm, wave):
    from captum_mllm.testing import tiny_wav2vec2_aligner

    aligner = tiny_wav2vec2_aligner()
    with pytest.raises(AlignmentError, match="2 transcripts for 1"):
        ChatInput(
            mixed_chat(wave), lfm, audio_unit="word", aligner=aligner, transcripts=["a b", "c"]
        )
    # Settings that another one leaves unread raise, as transcripts= alone does:
    # an aligner with 0.5 s windows went unused, and so did a fill for dropped audio.
    with pytest.raises(AlignmentError, match="aligner= is only read"):
        ChatInput(mixed_chat(wave), lfm, aligner=aligner)
    with pytest.raises(InvalidBaselineError, match="audio_fill= is only read"):
        ChatInput(mixed_chat(wave), lfm, audio_fill=torch.ones(()))


@pytest.mark.parametrize("text_baseline", ["drop", "replace"])
@pytest.mark.parametrize("audio_baseline", ["drop", "embedding", "silence"])
def test_a_batch_of_coalitions_gets_the_rows_each_gets_alone(
    lfm, wave, text_baseline, audio_baseline
):
    """The batch's input embeddings are built at once: each row is the one its
    coalition gets alone, absent text holds the replacement token's embedding
    and absent audio the fill (or is dropped)."""
    inp = ChatInput(
        mixed_chat(wave), lfm, audio_unit=0.25, text_baseline=text_baseline,
        audio_baseline=audio_baseline,
    )  # fmt: skip
    n = inp.n_itp_features
    coalitions = torch.randint(0, 2, (6, n), generator=torch.Generator().manual_seed(2))
    coalitions[0] = 1
    coalitions[1] = 0
    rows = lfm.masked_inputs(inp.to_model_input(coalitions))
    base = inp.encoded.state["embeds"]
    for c, row in zip(coalitions, rows, strict=True):
        assert torch.equal(row, lfm.masked_inputs(inp.to_model_input(c[None]))[0])
        present = inp.to_model_input(c[None]).present[0]
        is_audio = inp.encoded.clip >= 0
        kept = present | (~is_audio if text_baseline == "replace" else False)
        kept |= is_audio if audio_baseline != "drop" else False
        assert len(row) == int(kept.sum())
        full = torch.zeros_like(base)
        full[kept] = row
        # silence re-encodes the whole clip: only present text is the chat's own
        same = present & ~is_audio if audio_baseline == "silence" else present
        assert torch.equal(full[same], base[same])
        if text_baseline == "replace":
            fill = lfm._embed_text(torch.tensor([inp.replace_id]))[0]
            assert (full[~present & ~is_audio] == fill).all()
        if audio_baseline == "embedding":
            assert (full[~present & is_audio] == 0).all()
        elif audio_baseline == "silence" and bool((~present & is_audio).any()):
            assert not torch.equal(full[is_audio], base[is_audio])  # re-encoded


@pytest.mark.skipif(torch.cuda.is_available(), reason="the advice holds where CUDA is")
def test_no_advice_to_install_a_cuda_kernel_without_cuda(wave):
    """transformers told every CPU user of LFM2 to install causal_conv1d ("much
    slower" without it), a CUDA kernel that cannot be built there."""
    import logging

    from transformers.utils.logging import warning_once

    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger = logging.getLogger("transformers.integrations.hub_kernels")
    logger.addHandler(handler)
    warning_once.cache_clear()  # an earlier test may have had it said already
    try:
        lfm = LFM2AudioAdapter(*tiny_lfm2_audio())
        chat = Chat().user("Hi", audio=wave, sample_rate=16000)
        MultimodalLLMAttribution(FeatureAblation(lfm), lfm).attribute(
            ChatInput(chat, lfm, audio_unit=0.5), target="ok"
        )
    finally:
        logger.removeHandler(handler)
    assert not [r for r in seen if "causal_conv1d" in r.getMessage()]


def test_a_misspelt_generation_argument_raises(lfm, wave):
    """liquid-audio's generators take a few settings; any other name raises
    rather than generating 25 tokens of text as if it were not there."""
    inp = ChatInput(mixed_chat(wave), lfm, audio_unit=0.5)
    attr = MultimodalLLMAttribution(ShapleyValueSampling(lfm), lfm)
    for typo in ({"max_new_token": 3}, {"output_modalty": "audio"}):
        with pytest.raises(InvalidOptionError, match=rf"\['{next(iter(typo))}'\]"):
            attr.attribute(inp, gen_args=typo, n_samples=1)
    res = attr.attribute(inp, gen_args={"max_new_tokens": 3}, n_samples=1)
    assert len(res.output_tokens) == 3


def test_a_model_in_training_mode_encodes_and_scores_as_in_eval_mode(wave):
    """The conformer's batch norms in training mode normalised a clip by its own
    statistics (and moved the running ones), and the mel front end dithers in
    training mode: a ChatInput's audio embeddings differed by 0.5 from eval
    mode's. Encoding and explaining run in eval mode, and the modes come back."""
    model, processor = tiny_lfm2_audio()
    adapter = LFM2AudioAdapter(model, processor)
    chat = mixed_chat(wave)
    target = torch.tensor([300, 301])

    def explain() -> tuple[torch.Tensor, torch.Tensor]:
        inp = ChatInput(chat, adapter, audio_unit=0.5)
        res = MultimodalLLMAttribution(ShapleyValues(adapter), adapter).attribute(
            inp, target=target
        )
        return adapter.input_embeddings(inp.encoded), res.token_attr

    (front,) = [m for m in processor.audio.modules() if hasattr(m, "dither")]
    front.dither = 1e-3  # liquid-audio's default is 1e-5; the tiny processor's 0
    embeds, attr = explain()
    model.train()
    processor.train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert norms
    before = [m.running_mean.clone() for m in norms]
    again, attr_again = explain()
    torch.testing.assert_close(again, embeds, rtol=0, atol=0)
    torch.testing.assert_close(attr_again, attr, rtol=0, atol=0)
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before, strict=True))
    assert model.training and processor.audio.training


def test_a_chinese_transcript_is_timed_a_character_a_word(lfm):
    """Chinese is written without spaces: a spoken sentence was one "word"
    (the transcript's split()), so audio_unit="word" gave one feature for
    the whole clip. A character is a word, as in the text's features."""
    from captum_mllm.testing import tiny_wav2vec2_aligner

    path = "captum_mllm/data/question.wav"
    aligner = tiny_wav2vec2_aligner(letters="北京很大上海也")
    transcript = "北京很大。上海也很大。"
    spans = aligner.align(torch.from_numpy(sf.read(path, dtype="float32")[0]), 16000, transcript)
    assert [w for _, _, w in spans] == ["北", "京", "很", "大。", "上", "海", "也", "很", "大。"]
    chat = Chat().user("Answer.", audio=path)
    words = ["♪北", "♪京", "♪很", "♪大。", "♪上", "♪海", "♪也", "♪很", "♪大。"]
    for unit, said in (("word", words), ("sentence", ["♪北京很大。", "♪上海也很大。"])):
        inp = ChatInput(chat, lfm, audio_unit=unit, aligner=aligner, transcripts=transcript)
        labels = [f.label for f in inp.features if f.modality == "audio_in"]
        assert " ".join(labels).split() == said  # in order (too-short ones merged, as in English)
