"""Audio reading (soundfile's conventions) and forced alignment: Part 9a regressions."""

import io
import subprocess
import sys
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from captum_mllm import Chat
from captum_mllm.audio import load_audio
from captum_mllm.errors import AlignmentError, AudioError
from captum_mllm.testing import speech_like, tiny_wav2vec2_aligner


def _soundfile_reads(samples: np.ndarray, subtype: str) -> np.ndarray:
    """What soundfile gives back for the same PCM written to a WAV file (the oracle)."""
    buf = io.BytesIO()
    sf.write(buf, samples, 16000, format="WAV", subtype=subtype)
    buf.seek(0)
    return sf.read(buf, dtype="float32")[0]


@pytest.mark.parametrize(
    "dtype, subtype, peak",
    [(np.int16, "PCM_16", 32767), (np.int32, "PCM_32", 2**31 - 1)],
)
def test_integer_pcm_is_scaled_as_soundfile_scales_it(dtype, subtype, peak):
    samples = np.random.default_rng(0).integers(-peak, peak, size=1600, endpoint=True)
    wave, _, _ = load_audio(samples.astype(dtype), 16000)
    assert float(wave.abs().max()) <= 1.0
    expected = _soundfile_reads(samples.astype(dtype), subtype)
    np.testing.assert_allclose(wave.numpy(), expected, atol=1e-6)


def test_unscaled_float_pcm_warns():
    pcm = (speech_like(0.2).numpy() * 32767).round()  # int16 values cast to float
    with pytest.warns(UserWarning, match="int16: divide by 32768"):
        load_audio(pcm.astype(np.float32), 16000)
    with pytest.warns(UserWarning, match="peaks at"):  # a float WAV file holding them too
        buf = io.BytesIO()
        sf.write(buf, pcm.astype(np.float32), 16000, format="WAV", subtype="FLOAT")
        load_audio(buf.getvalue())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wave, _, _ = load_audio(pcm.astype(np.int16), 16000)  # its integer dtype: scaled
        load_audio(wave.numpy() * 1.2, 16000)  # a little past 1 (a clipped mix)


def test_unsigned_8_bit_pcm_is_centred():
    samples = np.array([0, 128, 255], dtype=np.uint8)
    wave, _, _ = load_audio(samples, 8000)
    np.testing.assert_allclose(wave.numpy(), [-1.0, 0.0, 127 / 128])


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_samples_are_refused(bad):
    samples = speech_like(0.2).numpy()
    samples[100] = bad  # one bad sample is enough
    with pytest.raises(AudioError, match="NaN or infinite"):
        load_audio(samples, 16000)


def test_stereo_in_either_layout_is_mixed_to_mono():
    left, right = speech_like(0.5, seed=1).numpy(), speech_like(0.5, seed=2).numpy()
    mono = (left + right) / 2
    for layout in (np.stack([left, right], axis=1), np.stack([left, right])):  # (n, 2), (2, n)
        wave, _, _ = load_audio(layout, 16000)
        assert wave.shape == (8000,)
        np.testing.assert_allclose(wave.numpy(), mono, atol=1e-6)
    tensor, _, _ = load_audio(torch.from_numpy(np.stack([left, right], axis=1)), 16000)
    assert tensor.shape == (8000,)


def test_a_list_of_numbers_is_one_waveform_and_a_list_of_clips_several():
    """transformers' feature extractors take a list of floats as one waveform
    (JSON gives no arrays); a list of arrays or paths is several clips."""
    samples = speech_like(0.3).numpy()
    whole = Chat().user(audio=samples, sample_rate=16000)[0].parts
    listed = Chat().user(audio=samples.tolist(), sample_rate=16000)[0].parts
    assert len(listed) == 1
    assert torch.equal(listed[0].waveform, whole[0].waveform)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": samples.tolist(),
                                             "sampling_rate": 16000}]}]  # fmt: skip
    assert torch.equal(Chat.from_messages(messages)[0].parts[0].waveform, whole[0].waveform)
    two = Chat().user(audio=[samples, samples[:800]], sample_rate=16000)[0].parts
    assert [p.waveform.shape[-1] for p in two] == [4800, 800]
    with pytest.raises(AudioError, match="cannot read audio of type int"):
        Chat().user(audio=[samples, 5], sample_rate=16000)  # clips, one of them not audio


def test_hugging_face_datasets_audio_values_are_read():
    """``datasets``' Audio column gives ``{"array", "sampling_rate", "path"}``
    decoded and ``{"bytes", "path"}`` undecoded; a chat message may hold either."""
    samples = speech_like(0.5).numpy()
    buf = io.BytesIO()
    sf.write(buf, samples, 8000, format="WAV", subtype="FLOAT")
    decoded = {"array": samples, "sampling_rate": 8000, "path": "train/0001.wav"}
    listed = {"array": samples.tolist(), "sampling_rate": 8000}  # nested in a datasets folder
    for value in (decoded, listed, {"bytes": buf.getvalue(), "path": None}):
        chat = Chat.from_messages(
            [{"role": "user", "content": [{"type": "audio", "audio": value}]}]
        )
        part = chat[0].parts[0]
        assert part.sample_rate == 8000 and part.source in ("<array>", "<bytes>")
        np.testing.assert_allclose(part.waveform.numpy(), samples, atol=1e-6)
    with pytest.raises(AudioError, match="sampling_rate=8000 and sample_rate=16000"):
        load_audio(decoded, 16000)
    with pytest.raises(AudioError, match="'array' and 'sampling_rate'"):
        load_audio({"audio": samples})


def test_a_read_only_array_is_read_without_torchs_warning():
    """pandas and Arrow give read-only arrays (a Parquet file's clips): torch
    warned that writing to the tensor would be undefined. It warns once a
    process, so a fresh one tells."""
    code = (
        "import numpy as np; from captum_mllm.audio import load_audio; "
        "a = np.full(1600, 0.1, np.float32); a.setflags(write=False); load_audio(a, 16000)"
    )
    run = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr[-500:]


def test_urls_are_not_downloaded():
    with pytest.raises(AudioError, match="URL"):
        load_audio("https://example.org/clip.wav")


def test_a_missing_file_is_named_with_its_full_path(tmp_path, monkeypatch):
    # soundfile said "Error opening 'clip.wav': System error."
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AudioError, match=f"no audio file at {tmp_path / 'clip.wav'}$"):
        load_audio("clip.wav")
    with pytest.raises(AudioError, match="no audio file at"):
        load_audio(tmp_path / "clip.wav")


def test_aligner_names_characters_it_cannot_spell():
    aligner = tiny_wav2vec2_aligner()
    with pytest.raises(AlignmentError, match=r"\['2'\]"):
        aligner.align(speech_like(1.0), 16000, "what is 2 plus 2")


def test_a_file_with_another_sample_rate_than_given_is_refused(tmp_path):
    # The header's rate was used and sample_rate= went unread.
    path = tmp_path / "q.wav"
    sf.write(path, speech_like(0.5).numpy(), 16000)
    with pytest.raises(AudioError, match="16000 Hz audio, not sample_rate=8000"):
        Chat().user("Hi", audio=str(path), sample_rate=8000)
    wave, rate, _ = load_audio(path, 16000)  # the same rate, said aloud
    assert rate == 16000 and len(wave) == 8000
    part = Chat().user(audio=str(path))[0].parts[0]  # an AudioPart passed on: the same
    with pytest.raises(AudioError, match="16000 Hz audio, not sample_rate=8000"):
        Chat().user("Hi", audio=part, sample_rate=8000)
    assert Chat().user(audio=part, sample_rate=16000)[0].parts[0] is part
