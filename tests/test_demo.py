"""The trained demo speech model: its recipe runs, its weights answer, its
explanations point at the deciding spoken word."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from captum_mllm import MultimodalLLMAttribution, demo
from captum_mllm.audio import ForcedAligner
from captum_mllm.demo import task, train
from captum_mllm.errors import AlignmentError
from captum_mllm.methods import ExactShapleyValues
from captum_mllm.models.lfm2_audio import LFM2AudioAdapter
from captum_mllm.testing import speech_like

MIN_RATE = 0.9  # 36 of 36 measured on the committed weights (model card)


@pytest.fixture(scope="module")
def speech_model():
    return demo.load()


def test_training_recipe_runs_end_to_end(tmp_path, monkeypatch):
    # espeak-ng is replaced by synthetic speech: the test checks the recipe, not espeak.
    def fake_espeak(text, voice="en-us", speed=160, pitch=50):
        return speech_like(0.1 + 0.05 * len(text), seed=len(text) + speed)

    monkeypatch.setattr(task, "espeak", fake_espeak)
    figures = train.main(
        ["--out", str(tmp_path), "--clips", "12", "--held-out", "6", "--steps", "3",
         "--aligner-steps", "3", "--workers", "1", "--batch-size", "4"]
    )  # fmt: skip
    assert 0.0 <= figures["held_out_accuracy"] <= 1.0
    assert np.isfinite(figures["boundary_error_mean_ms"])
    model = LFM2AudioAdapter.from_pretrained(str(tmp_path / "model"), device="cpu")
    assert model.dtype == torch.float32
    aligner = ForcedAligner(str(tmp_path / "aligner"))
    spans = aligner.align(speech_like(1.5), 16000, "turn the fan on")
    assert [w for _, _, w in spans] == ["turn", "the", "fan", "on"]
    saved = json.loads((tmp_path / "training.json").read_text())
    assert saved["steps"] == 3 and (tmp_path / "clips" / "examples.json").is_file()


def test_random_subsets_answer_unknown_for_exactly_the_silenced_deciding_words():
    request = task.Request("kitchen", "fan", "off", template=1)  # turn the kitchen fan off
    words = request.transcript.split()
    spans = [(0.1 + 0.3 * i, 0.3 + 0.3 * i, w) for i, w in enumerate(words)]
    wave = torch.ones(int(0.1 * 16000 + 0.3 * len(words) * 16000) + 1600)
    clip = task.Utterance(request, wave, spans)
    copies = train.subsets_left_out([clip] * 200, seed=0)
    assert 100 < len(copies) < 200  # a copy with nothing silent is left out
    fed = 0
    for copy in copies:
        silent = {w for a, _, w in spans if copy.waveform[round(a * 16000) + 10] == 0}
        assert silent  # the word and the pause after it are zeroed, the rest kept
        assert copy.waveform.sum() < wave.sum()
        heard = [w if w not in silent else task.UNKNOWN for w in request.deciding]
        assert copy.expected == " ".join(heard)
        assert copy.fed_back in (copy.expected, request.answer)
        fed += copy.fed_back == request.answer and copy.expected != request.answer
    sizes = [
        sum(int(copy.waveform[round(a * 16000) + 10] == 0) for a, _, _ in spans) for copy in copies
    ]
    assert set(sizes) == set(range(1, len(words) + 1))  # every number of silent words
    assert 0.3 < fed / len(copies) < 0.7  # the request's own answer fed back in about half


def test_committed_weights_answer_the_bundled_requests(speech_model):
    model, _ = speech_model
    card = json.loads((demo.WEIGHTS / "training.json").read_text())
    examples = demo.examples()
    assert len(examples) >= 6
    right = [train.answer_of(model, ex.waveform) == ex.answer for ex in examples]
    # The card's held-out accuracy, on clips the training never saw.
    assert np.mean(right) >= min(card["held_out_accuracy"], 1.0) - 1.0 / len(examples)


def test_a_silenced_deciding_word_is_answered_unknown(speech_model):
    # Trained with deciding words silenced (train.deciding_left_out): the answer
    # word of a word that is not heard is "unknown", the others stay.
    model, _ = speech_model
    right = []
    for ex in demo.examples()[:6]:
        for slot, word in enumerate(ex.deciding):
            start, stop, _ = next(s for s in ex.spans if s[2] == word)
            wave = ex.waveform.clone()
            wave[round(start * task.SAMPLE_RATE) : round(stop * task.SAMPLE_RATE)] = 0.0
            expected = list(ex.deciding)
            expected[slot] = task.UNKNOWN
            right.append(train.answer_of(model, wave) == " ".join(expected))
    assert np.mean(right) >= 0.8, right


def test_aligner_finds_the_spoken_words(speech_model):
    _, aligner = speech_model
    for ex in demo.examples():
        got = aligner.align(ex.waveform, task.SAMPLE_RATE, ex.transcript)
        assert [w for _, _, w in got] == ex.transcript.split()
        errors = train.boundary_errors(aligner, [_utterance(ex)])
        assert np.median(errors) < 0.1  # seconds


def test_the_aligner_skips_unspoken_punctuation(speech_model):
    """A transcript as people write it ("Please, turn on the kitchen light!")
    was refused: the aligner's vocabulary lacks "," and "!"."""
    _, aligner = speech_model
    ex = demo.examples()[0]
    words = ex.transcript.split()
    written = " ".join([words[0].capitalize() + ",", *words[1:-1], words[-1] + "!"])
    plain = aligner.align(ex.waveform, task.SAMPLE_RATE, ex.transcript)
    punctuated = aligner.align(ex.waveform, task.SAMPLE_RATE, written)
    assert [w for _, _, w in punctuated] == written.split()  # labels as written
    assert [s[:2] for s in punctuated] == [s[:2] for s in plain]  # the same spans
    with pytest.raises(AlignmentError, match=r"words \['—'\]"):
        aligner.align(ex.waveform, task.SAMPLE_RATE, f"{words[0]} — {' '.join(words[1:])}")


def test_spoken_sentences_are_features_of_their_aligned_words(speech_model):
    """audio_unit="sentence": the aligned words of each of the transcript's
    sentences, one feature (the positions of its words' features together)."""
    model, aligner = speech_model
    ex = demo.examples()[0]
    words = ex.transcript.split()
    said = " ".join(words[:3]) + ". " + " ".join(words[3:]) + "!"  # two sentences
    by_word = demo.request_input(model, aligner, ex.waveform, said)
    by_sentence = demo.request_input(model, aligner, ex.waveform, said, audio_unit="sentence")
    assert by_sentence.values == [
        "♪" + " ".join(said.split()[:3]),
        "♪" + " ".join(said.split()[3:]),
    ]
    audio = [f for f in by_word.features if f.modality == "audio_in"]
    first, second = (f for f in by_sentence.features if f.modality == "audio_in")
    assert set(first.positions) == {p for f in audio[:3] for p in f.positions}
    assert set(second.positions) == {p for f in audio[3:] for p in f.positions}
    assert first.time == (audio[0].time[0], audio[2].time[1])
    # The Owen tree of the words: clip > sentence > word
    assert by_word.feature_tree() == [[0, 1, 2], list(range(3, len(words)))]
    one = demo.request_input(model, aligner, ex.waveform, ex.transcript)
    assert one.feature_tree() == list(range(len(words)))


def _utterance(ex):
    words = ex.transcript.split()
    request = next(
        r for r in task.all_requests() if r.transcript == ex.transcript
    )  # the phrasing that says these words
    assert request.transcript.split() == words
    return task.Utterance(request, ex.waveform, ex.spans)


def _deciding_word_first_rate(speech_model, examples):
    model, aligner = speech_model
    hits = []
    for ex in examples:
        inp = demo.request_input(model, aligner, ex.waveform, ex.transcript)
        res = MultimodalLLMAttribution(ExactShapleyValues(model), model).attribute(
            inp, target=ex.answer, perturbations_per_eval=128
        )
        top = demo.top_words(res)
        hits += [word in top[k] for k, word in enumerate(ex.deciding)]
    return np.mean(hits)


def test_exact_shapley_puts_the_deciding_words_first(speech_model):
    # The ground truth: the spoken room, device and action decide the answer's
    # three tokens. Over the 12 bundled held-out requests (36 answer tokens),
    # exact Shapley with silenced words ranks the deciding word first for
    # most of them (the rate the benchmark reports is printed by
    # benchmarks/faithfulness.py --speech-only).
    rate = _deciding_word_first_rate(speech_model, demo.examples())
    assert rate >= MIN_RATE, rate


def test_exact_shapley_finds_the_deciding_words_in_whole_sentences(speech_model):
    # 8 bundled held-out requests spoken as one sentence, their words placed by
    # the demo aligner: 23 of 24 answer tokens measured (the weights trained
    # without random-subset copies: 20 of 24).
    rate = _deciding_word_first_rate(speech_model, demo.examples(sentences=True))
    assert rate >= MIN_RATE, rate


def test_a_foil_one_slot_away_puts_that_slots_spoken_word_first(speech_model):
    """Why "kitchen light on" rather than "bedroom light on"? Contrasted with a
    foil that changes one slot (ContrastiveTarget), the whole answer's
    attribution puts the spoken word deciding that slot first: 36 of 36 on the
    bundled requests (the answer alone can name one word of three)."""
    from captum_mllm import ContrastiveTarget
    from captum_mllm.demo import task

    model, aligner = speech_model
    slots = (task.ROOMS, task.DEVICES, task.ACTIONS)
    hits = []
    for ex in demo.examples():
        inp = demo.request_input(model, aligner, ex.waveform, ex.transcript)
        words = ex.answer.split()
        for k, deciding in enumerate(ex.deciding):
            other = slots[k][(slots[k].index(words[k]) + 1) % len(slots[k])]
            foil = ContrastiveTarget(" ".join([*words[:k], other, *words[k + 1 :]]))
            attr = MultimodalLLMAttribution(ExactShapleyValues(model), model, target=foil)
            res = attr.attribute(inp, target=ex.answer, perturbations_per_eval=128)
            top = res.input_tokens[int(res.seq_attr.argmax())].replace("♪", " ").split()
            hits.append(deciding in top)
    assert len(hits) == 36 and np.mean(hits) >= MIN_RATE, hits


def test_speech_demo_command(tmp_path, capsys):
    from captum_mllm.cli import main

    main(["demo", "--speech", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    ex = demo.examples()[0]
    assert f"deciding word: {ex.deciding[0]!r}" in out
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["response_text"].strip() == ex.answer
    from captum_mllm import MultimodalLLMAttributionResult

    res = MultimodalLLMAttributionResult.load(tmp_path / "result.json")
    assert ex.deciding[0] in demo.top_words(res)[0]
    assert (tmp_path / "audio_attr.png").is_file() and (tmp_path / "report.html").is_file()
