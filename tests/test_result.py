"""Results are plain data: saved and reopened exactly, drawn the same."""

import dataclasses
import json
import warnings

import matplotlib
import numpy as np
import pytest
import soundfile as sf
import torch
from captum.attr import FeatureAblation, LLMAttributionResult

from captum_mllm import (
    Chat,
    ChatInput,
    EmbeddingSimilarity,
    LFM2AudioAdapter,
    MultimodalLLMAttribution,
    MultimodalLLMAttributionResult,
)
from captum_mllm.errors import (
    AudioError,
    InconsistentVersionWarning,
    InvalidOptionError,
    ResultFormatError,
)
from captum_mllm.testing import speech_like, tiny_lfm2_audio

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def spoken(tmp_path_factory):
    """A spoken chat (one clip from a file, one from an array) explained on
    LFM2-Audio with a spoken answer."""
    path = tmp_path_factory.mktemp("audio") / "question.wav"
    sf.write(path, speech_like(1.0).numpy(), 16000)
    lfm = LFM2AudioAdapter(*tiny_lfm2_audio())
    chat = (
        Chat()
        .system("Be brief.")
        .user("What is it?", audio=str(path))
        .user("And this?", audio=speech_like(0.5, seed=1), sample_rate=16000)
    )
    inp = ChatInput(chat, lfm, audio_unit=0.5)
    attr = MultimodalLLMAttribution(FeatureAblation(lfm), lfm)
    gen = {"max_new_tokens": 8, "output_modality": "text+audio"}
    return attr.attribute(inp, gen_args=gen, perturbations_per_eval=32), path


def _same(a, b):
    for name in ("seq_attr", "token_attr", "seq_attr_std", "seq_attr_stderr", "token_attr_stderr",
                 "target_ids", "output_probs"):  # fmt: skip
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(torch.as_tensor(x), torch.as_tensor(y)), name
    for name in ("input_tokens", "output_tokens", "features", "responses", "roles", "provenance",
                 "response_text", "segments", "n_model_calls", "n_coalitions",
                 "n_unique_coalitions", "n_stored_coalitions", "wall_time"):  # fmt: skip
        assert getattr(a, name) == getattr(b, name), name
    assert len(a.clips) == len(b.clips)
    for c, d in zip(a.clips, b.clips, strict=True):
        assert (c.turn, c.sample_rate) == (d.turn, d.sample_rate)
        assert torch.equal(c.samples(), d.samples())
    if a.output_audio is not None:
        assert torch.equal(a.output_audio["codes"], b.output_audio["codes"])


def _pixels(fig_ax):
    fig = fig_ax[0]
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba()).copy()
    matplotlib.pyplot.close(fig)
    return pixels


@pytest.mark.parametrize("embed_audio", [True, False])
def test_a_spoken_result_round_trips_and_draws_the_same(spoken, tmp_path, embed_audio):
    res, path = spoken
    assert res.inp is None  # no input, adapter or weights inside
    saved = res.save(tmp_path / "res.json", embed_audio=embed_audio)
    back = MultimodalLLMAttributionResult.load(saved)
    _same(res, back)
    assert back.clips[0].path == str(path)
    assert (back.clips[0].waveform is None) == (not embed_audio)  # read back from its file
    assert back.output_audio["codes"].shape[0] == 8
    for draw in (
        lambda r: r.plot_token_attr(),
        lambda r: r.plot_seq_attr(),
        lambda r: r.plot_audio_attr(turn=1),
        lambda r: r.plot_audio_attr(turn=2, target_token_pos=(0, 3)),
    ):
        assert np.array_equal(_pixels(draw(res)), _pixels(draw(back)))


def test_a_clip_that_changed_after_the_explanation_is_refused(spoken, tmp_path):
    """A result saved without its audio draws the clip from its file: the
    file must still hold the samples that were explained."""
    res, path = spoken
    back = MultimodalLLMAttributionResult.load(res.save(tmp_path / "r.json", embed_audio=False))
    copy = tmp_path / "clip.wav"
    copy.write_bytes(path.read_bytes())
    clip = dataclasses.replace(back.clips[0], path=str(copy))  # the file, moved
    assert torch.equal(clip.samples(), res.clips[0].samples())
    wave, rate = sf.read(copy, dtype="float32")
    wave[len(wave) // 2] += 0.25
    sf.write(copy, wave, rate, subtype="FLOAT")
    with pytest.raises(AudioError, match="has changed since it was explained"):
        clip.samples()
    # A file gone: every plot and the report say so alike (the chat plot raised
    # soundfile's own "System error")
    back.clips[0] = dataclasses.replace(clip, path=str(tmp_path / "gone.wav"))
    for draw in (back.plot_chat_attr, back.plot_audio_attr, back.to_html):
        with pytest.raises(AudioError, match="no audio file at .*gone.wav"):
            draw()


def test_a_clip_given_by_a_relative_path_is_found_from_another_folder(tmp_path, monkeypatch):
    """A result saved without its audio kept the path as given ("q.wav"): read
    from any other folder, its plots found no file."""
    lfm = LFM2AudioAdapter(*tiny_lfm2_audio())
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    sf.write("q.wav", speech_like(0.5).numpy(), 16000)
    inp = ChatInput(Chat().user("Hi", audio="q.wav"), lfm, audio_unit=0.5)
    res = MultimodalLLMAttribution(FeatureAblation(lfm), lfm).attribute(inp, target="ok")
    saved = res.save("out/r.json", embed_audio=False).resolve()
    monkeypatch.chdir(tmp_path)
    back = MultimodalLLMAttributionResult.load(saved)
    assert back.clips[0].path == str(tmp_path / "run" / "q.wav")
    assert torch.equal(back.clips[0].samples(), res.clips[0].samples())


def test_a_sampled_similarity_result_round_trips(model, chat, tmp_path):
    sim = EmbeddingSimilarity(
        gen_args={"max_new_tokens": 5}, samples_per_coalition=2, temperature=1.2
    )
    res = MultimodalLLMAttribution(FeatureAblation(model), model, target=sim).attribute(
        ChatInput(chat, model)
    )
    assert res.seq_attr_std is not None and isinstance(res.responses[(1, 1, 1, 1, 1)], list)
    back = MultimodalLLMAttributionResult.load(res.save(tmp_path / "sim.json"))
    _same(res, back)
    assert back.to_dataframe().equals(res.to_dataframe())
    assert back.provenance["target"]["samples_per_coalition"] == 2
    assert back.provenance["method"] == "FeatureAblation"
    with pytest.raises(InvalidOptionError, match=r"\.json"):  # JSON and arrays in one file
        res.save(tmp_path / "sim.npz")


def test_a_result_names_the_settings_its_method_was_built_with(model, chat, tmp_path):
    """A result kept the attribute() arguments but not the method's own
    (prune=, exact_limit=, level_estimator=), on which its values also hang."""
    from captum_mllm.methods import HierarchicalShapley, LeverageKernelShap
    from captum_mllm.viz.report import render_report

    method = HierarchicalShapley(model, prune=0.25, level_estimator=LeverageKernelShap)
    res = MultimodalLLMAttribution(method, model).attribute(
        ChatInput(chat, model), target="Paris.", budget=100, seed=3
    )
    back = MultimodalLLMAttributionResult.load(res.save(tmp_path / "r.json"))
    assert back.provenance["method_settings"] == {
        "max_children": 16, "prune": 0.25, "level_estimator": "LeverageKernelShap",
        "contexts": 4, "exact_limit": None,
    }  # fmt: skip
    assert back.provenance["method_args"]["budget"] == 100
    page = render_report(back)
    assert "HierarchicalShapley(max_children=16, prune=0.25, level_estimator=Leverage" in page
    assert "budget=100" in page and "seed=3" in page


def test_unreadable_or_foreign_results_raise(tmp_path, model, chat):
    with pytest.raises(ResultFormatError):
        MultimodalLLMAttributionResult.load(tmp_path / "missing.json")
    res = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(
        ChatInput(chat, model), target="Paris."
    )
    saved = res.save(tmp_path / "r.json")
    text = saved.read_text()
    saved.write_text(text.replace('"schema_version": 1', '"schema_version": 99'))
    with pytest.raises(ResultFormatError, match="schema version 99"):
        MultimodalLLMAttributionResult.load(saved)
    saved.write_text(text.replace('"captum-mllm": "', '"captum-mllm": "0.0.0-'))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MultimodalLLMAttributionResult.load(saved)
    assert any(issubclass(w.category, InconsistentVersionWarning) for w in caught)
    # A cut or hand-edited file raised a bare KeyError or AttributeError
    whole = json.loads(text)
    for cut in ("counts", "features", "input_tokens"):
        saved.write_text(json.dumps({k: v for k, v in whole.items() if k != cut}))
        with pytest.raises(ResultFormatError, match=f"not a whole saved result: KeyError '{cut}'"):
            MultimodalLLMAttributionResult.load(saved)
    saved.write_text("[1, 2]")
    with pytest.raises(ResultFormatError, match="r.json is not a saved captum-mllm result"):
        MultimodalLLMAttributionResult.load(saved)
    other = tmp_path / "config.json"  # another JSON file: its missing .npz was named
    other.write_text('{"model": "x"}')
    with pytest.raises(ResultFormatError, match="config.json is not a saved captum-mllm result"):
        MultimodalLLMAttributionResult.load(other)


def test_a_save_cut_short_leaves_the_earlier_result_and_a_cut_npz_is_named(
    tmp_path, model, chat, monkeypatch
):
    """A data set's worker killed while saving left a cut .npz beside the
    earlier JSON, whose load raised zipfile's BadZipFile (a rerun stopped on it
    rather than explaining the chat again)."""
    import numpy as np

    res = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(
        ChatInput(chat, model), target="Paris."
    )
    saved = res.save(tmp_path / "r.json")
    arrays = saved.with_suffix(".npz")
    whole = arrays.read_bytes()

    def killed(file, **arrays):  # half the arrays written, then the process ends
        file.write(whole[: len(whole) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        res.normalized().save(saved)
    monkeypatch.undo()
    back = MultimodalLLMAttributionResult.load(saved)  # the earlier result, whole
    torch.testing.assert_close(back.seq_attr, res.seq_attr)
    arrays.write_bytes(whole[: len(whole) // 2])  # cut by other means
    with pytest.raises(ResultFormatError, match="cannot read a saved result"):
        MultimodalLLMAttributionResult.load(saved)


def test_a_folder_is_read_as_the_result_it_holds(tmp_path, model, chat):
    """The folder `captum-mllm explain` writes (or a chat's of explain_dataset)
    raised "[Errno 21] Is a directory"."""
    res = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(
        ChatInput(chat, model), target="Paris."
    )
    res.save(tmp_path / "runs" / "paris" / "result.json")
    back = MultimodalLLMAttributionResult.load(tmp_path / "runs" / "paris")
    torch.testing.assert_close(back.seq_attr, res.seq_attr)
    with pytest.raises(ResultFormatError, match=r"runs is an explain_dataset folder .*runs.<chat>"):
        MultimodalLLMAttributionResult.load(tmp_path / "runs")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResultFormatError, match="no saved result in .*empty .no result.json"):
        MultimodalLLMAttributionResult.load(tmp_path / "empty")
    # and a folder is written as load reads it: save(folder) raised Errno 21
    # after leaving folder.npz and folder.partial beside it
    assert res.save(tmp_path / "empty") == tmp_path / "empty" / "result.json"
    back = MultimodalLLMAttributionResult.load(tmp_path / "empty")
    torch.testing.assert_close(back.seq_attr, res.seq_attr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "runs"]


def test_a_result_names_the_input_settings_that_made_its_features(model, chat, tmp_path):
    """A saved result did not say which baseline, unit or roles made its
    features, and each gives other attributions of the same chat."""
    from captum.attr import Saliency

    from captum_mllm import MultimodalLLMGradientAttribution

    inp = ChatInput(chat, model, roles=("system", "user"), text_baseline="replace", skip="special")
    settings = {
        "roles": ["system", "user"],
        "text_unit": "word",
        "skip": ["special"],
        "text_baseline": "replace",
        "replace_id": inp.replace_id,
        "audio_unit": 0.5,
        "audio_baseline": "drop",
        "audio_fill": None,
        "transcripts": None,
        "chat_template_kwargs": {},
    }
    perturbed = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(inp, target="Hi")
    gradient = MultimodalLLMGradientAttribution(Saliency(model), model).attribute(inp, target="Hi")
    for res in (perturbed, gradient):
        back = MultimodalLLMAttributionResult.load(res.save(tmp_path / "r.json"))
        assert back.provenance["input_settings"] == settings


def test_a_word_said_twice_keeps_each_value_in_seq_attr_dict(model):
    """Captum's seq_attr_dict keys values by label: of three "the", two were lost."""
    inp = ChatInput(Chat().user("the cat saw the dog and the bird"), model)
    res = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(inp, target="Yes.")
    values = res.seq_attr_dict
    assert list(values) == ["the", "cat", "saw", "the (2)", "dog", "and", "the (3)", "bird"]
    assert list(values.values()) == res.seq_attr.tolist()
    once = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(
        ChatInput(Chat().user("a cat saw dogs"), model), target="Yes."
    )
    assert once.seq_attr_dict == LLMAttributionResult.seq_attr_dict.fget(once)  # Captum's
