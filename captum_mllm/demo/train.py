"""Train the demo speech model and its word aligner (needs espeak-ng).

Run: ``python -m captum_mllm.demo.train [--out captum_mllm/demo/weights] [--seed 0]``.
The defaults reproduce the committed weights in about 16 minutes on 2 CPU
cores; ``--steps 5 --clips 40`` runs the whole recipe in seconds (the test).

The model is LFM2-Audio's architecture (liquid-audio's conformer encoder,
LFM2 backbone and depthformer) at a few million parameters, trained to answer
a spoken request with its room, device and action (:mod:`.task`); only the
text head is trained (the audio-output layers stay at their seeded
initialisation). The aligner is a small ``ParakeetForCTC`` (its convolutional
front end on log-mel features) trained with character CTC on the same speech.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import save_file

from captum_mllm.chat import Chat
from captum_mllm.demo.task import (
    ACTIONS,
    DEVICES,
    ROOMS,
    SAMPLE_RATE,
    SYSTEM_PROMPT,
    UNKNOWN,
    Request,
    Utterance,
    all_requests,
    synthesise,
)
from captum_mllm.inputs import ChatInput
from captum_mllm.models.batching import pad_rows
from captum_mllm.models.lfm2_audio import LFM2AudioAdapter
from captum_mllm.testing import lfm2_audio_config, lfm2_audio_from_config, tiny_lfm2_tokenizer_dir

LETTERS = ("<pad>", "<s>", "</s>", "<unk>", "|", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ'")
# The tiny test model's architecture, grown where the task needs it.
SHAPE: dict[str, dict[str, Any]] = dict(
    preprocessor=dict(features=64),
    encoder=dict(feat_in=64, n_layers=2, d_model=64, subsampling_conv_channels=32, n_heads=4),
    lfm=dict(
        num_hidden_layers=4, layer_types=["conv", "full_attention", "conv", "full_attention"],
        initializer_range=0.02,
    ),
    depthformer=dict(dim=32),
)  # fmt: skip


def config(vocab_size: int) -> dict[str, Any]:
    """The demo model's ``config.json`` (liquid-audio's layout)."""
    return lfm2_audio_config(**{**SHAPE, "lfm": {**SHAPE["lfm"], "vocab_size": vocab_size}})


def new_model(folder: Path, seed: int) -> tuple[Any, Any]:
    """A freshly initialised demo model and its processor, tokenizer in ``folder``."""
    from transformers import AutoTokenizer

    tiny_lfm2_tokenizer_dir(ROOMS + DEVICES + ACTIONS + (UNKNOWN,), path=str(folder))
    conf = config(len(AutoTokenizer.from_pretrained(folder)))
    (folder / "config.json").write_text(json.dumps(conf, indent=1))
    return lfm2_audio_from_config(conf, str(folder), seed)


# Data -------------------------------------------------------------------------------


def _synthesise_chunk(args: tuple[list[Request], int]) -> list[Utterance]:
    requests, seed = args
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    return [synthesise(r, rng) for r in requests]


def make_data(n: int, seed: int, workers: int = 2, cache: Path | None = None) -> list[Utterance]:
    """``n`` spoken requests (all requests in turn, random voices), in parallel;
    kept in ``cache`` (a folder) when given, to try recipes without re-synthesis."""
    file = None if cache is None else cache / f"speech_{n}_{seed}.pt"
    if file is not None and file.exists():
        rows = torch.load(file, weights_only=True)  # our own cache: tensors, lists, str
        return [
            Utterance(Request(*r["request"]), r["waveform"], [tuple(s) for s in r["spans"]])
            for r in rows
        ]
    pool_of = all_requests()
    rng = np.random.default_rng(seed)
    requests = [pool_of[i] for i in rng.permutation(n) % len(pool_of)]
    chunks = [(requests[i::workers], seed * 1000 + i) for i in range(workers)]
    if workers == 1:
        parts = [_synthesise_chunk(chunks[0])]
    else:
        with Pool(workers) as pool:
            parts = pool.map(_synthesise_chunk, chunks)
    out = [u for part in parts for u in part]
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.save([{"request": [u.request.room, u.request.device, u.request.action,
                                 u.request.template], "waveform": u.waveform,
                     "spans": [[float(a), float(b), w] for a, b, w in u.spans]}
                    for u in out], file)  # fmt: skip
    return out


def _word_and_pause(spans: Sequence[tuple[float, float, str]], i: int) -> tuple[int, int]:
    """Samples of word ``i`` and of the pause after it (to the next word's start)."""
    stop = spans[i + 1][0] if i + 1 < len(spans) else spans[i][1]
    return round(spans[i][0] * SAMPLE_RATE), round(stop * SAMPLE_RATE)


def words_left_out(utterances: Sequence[Utterance], seed: int) -> list[Utterance]:
    """Copies of the utterances with word spans (:func:`with_spans`) with one or
    two words that decide nothing cut out (the word and the pause after it) or
    zeroed, at random.

    Trained on these too, the model answers from the deciding words alone and
    is not thrown by a missing filler word, so what an explanation removes is
    what the answer depends on (the perturbations every Shapley method makes).
    """
    rng = np.random.default_rng(seed)
    out = []
    for u in utterances:
        fillers = [i for i, (_, _, w) in enumerate(u.spans) if w not in u.request.deciding]
        if not fillers:
            continue
        chosen = rng.choice(
            fillers, size=int(rng.integers(1, min(2, len(fillers)) + 1)), replace=False
        )
        wave = u.waveform.clone()
        keep = torch.ones(len(wave), dtype=torch.bool)
        cut = bool(rng.random() < 0.5)
        for i in sorted(int(c) for c in chosen):
            start, stop = _word_and_pause(u.spans, i)
            if cut:
                keep[start:stop] = False
            else:  # as the "silence" audio baseline does: samples set to zero
                wave[start:stop] = 0.0
        out.append(Utterance(u.request, wave[keep]))
    return out


def with_spans(utterances: Sequence[Utterance], aligner: Any) -> list[Utterance]:
    """The utterances with word spans: known for joined-word clips, found by the
    aligner for whole sentences."""
    out = []
    for u in utterances:
        spans = u.spans or aligner.align(u.waveform, SAMPLE_RATE, u.request.transcript)
        out.append(Utterance(u.request, u.waveform, spans))
    return out


def deciding_left_out(utterances: Sequence[Utterance], seed: int) -> list[Utterance]:
    """Copies of the joined-word utterances (spans known exactly, so nothing of
    the word is left) with one deciding word zeroed (as
    the ``"silence"`` baseline does), answered with ``unknown`` in its place.

    Trained on these too, the model ties each answer word to the sound of its
    own deciding word: silence that word and the answer word goes, silence any
    other and it stays. Without them a model may answer "fan" whenever no
    device is heard, and an explanation of "fan" then finds nothing to credit.
    """
    rng = np.random.default_rng(seed + 1)
    out = []
    for u in utterances:
        if not u.spans:
            continue
        word = u.request.deciding[int(rng.integers(3))]
        out.append(_silenced(u, [next(i for i, s in enumerate(u.spans) if s[2] == word)]))
    return out


def subsets_left_out(utterances: Sequence[Utterance], seed: int) -> list[Utterance]:
    """Copies of the utterances with word spans with a random subset of their
    words zeroed (each word with the same chance, itself uniform in 0..1, so
    every number of words is as likely), every silenced deciding word answered
    ``unknown``; in half of them the words fed back before each answer word
    are the request's own answer.

    These are the clips an explanation makes: Shapley values weigh coalitions
    of every size, and the model must answer each of them from the words it
    hears, one answer word from one spoken word. Trained on a single silenced
    word only, it falls back on a default ("on" when no "off" is heard) as
    soon as more is silent, and that default takes the credit away from the
    word that decides. An explanation of an answer word also reads the full
    answer before it (``kitchen light`` before ``on``) whatever was silenced:
    trained on that, the model answers "on" from the sound of "on" alone, not
    from whether the room it was told was heard.
    """
    rng = np.random.default_rng(seed + 2)
    out = []
    for u in utterances:
        if not u.spans:
            continue
        silent = rng.random(len(u.spans)) < rng.random()
        if not silent.any():
            continue
        given = u.request.answer if rng.random() < 0.5 else None
        out.append(_silenced(u, np.flatnonzero(silent).tolist(), given))
    return out


def _silenced(u: Utterance, words: Sequence[int], given: str | None = None) -> Utterance:
    """``u`` with words ``words`` zeroed (each with the pause after it), every
    silenced deciding word answered ``unknown``."""
    wave = u.waveform.clone()
    answer = list(u.request.deciding)
    for i in words:
        start, stop = _word_and_pause(u.spans, i)
        wave[start:stop] = 0.0
        if u.spans[i][2] in answer:
            answer[answer.index(u.spans[i][2])] = UNKNOWN
    return Utterance(u.request, wave, u.spans, answer=" ".join(answer), given=given)


# The speech model -----------------------------------------------------------------------


class Examples:
    """Training rows of the model: mel features and the text around them."""

    def __init__(self, adapter: LFM2AudioAdapter, utterances: Sequence[Utterance]) -> None:
        self.utterances = list(utterances)
        layout = adapter.encode(_chat(utterances[0].waveform))
        ids, clip = layout.input_ids, layout.clip
        assert clip is not None
        audio = torch.nonzero(clip >= 0)[:, 0]
        self.prefix, self.suffix = ids[: int(audio[0])], ids[int(audio[-1]) + 1 :]

        def answer_ids(text: str) -> torch.Tensor:
            return torch.tensor(
                adapter.tokenizer(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
            )

        self.answers = [answer_ids(u.expected) for u in utterances]
        self.fed_back = [answer_ids(u.fed_back) for u in utterances]  # one token a word
        assert all(len(a) == len(f) for a, f in zip(self.answers, self.fed_back, strict=True))
        with torch.no_grad():
            self.mels = [
                adapter.processor.audio(u.waveform[None], torch.tensor([len(u.waveform)]))[0][0]
                for u in utterances
            ]  # (features, frames) each

    def loss(self, model: Any, index: Sequence[int]) -> torch.Tensor:
        """Cross-entropy of the answers (teacher forced) of rows ``index``."""
        mels = [self.mels[i] for i in index]
        lens = torch.tensor([m.shape[1] for m in mels])
        width = int(lens.max())
        batch = torch.stack([torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in mels])
        enc, enc_len = model.conformer(batch, lens)
        audio = model.audio_adapter(enc.mT)
        embed = model.lfm.embed_tokens
        rows, labels = [], []
        for b, i in enumerate(index):
            answer = self.answers[i]
            text_after = torch.cat([self.suffix, self.fed_back[i]])
            rows.append(
                torch.cat([embed(self.prefix), audio[b, : int(enc_len[b])], embed(text_after[:-1])])
            )
            label = torch.full((len(rows[-1]),), -100)
            label[-len(answer) :] = answer
            labels.append(label)
        x, mask = pad_rows(rows)
        y, _ = pad_rows(labels, fill=-100)
        hidden = model.lfm(inputs_embeds=x, attention_mask=mask).last_hidden_state
        logits = hidden @ embed.weight.T
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


def _chat(wave: torch.Tensor) -> Chat:
    return Chat().system(SYSTEM_PROMPT).user(audio=wave, sample_rate=SAMPLE_RATE)


def train_loop(
    parameters: Any,
    loss_of: Callable[[Sequence[int]], torch.Tensor],
    n: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    name: str,
) -> None:
    """AdamW with warm-up and cosine decay over random batches of ``n`` rows."""
    opt = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    rng = np.random.default_rng(seed)
    start, running = time.time(), 0.0
    for step in range(steps):
        loss = loss_of(rng.choice(n, size=min(batch_size, n), replace=False).tolist())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        value = float(loss.detach())
        running = 0.95 * running + 0.05 * value if step else value
        if step % 100 == 0 or step == steps - 1:
            print(f"  {name} step {step:5d}  loss {running:.4f}  {time.time() - start:.0f} s")


def answer_of(adapter: LFM2AudioAdapter, wave: torch.Tensor) -> str:
    """The model's greedy text answer to a spoken request."""
    inp = ChatInput(_chat(wave), adapter)
    said = adapter.generate_masked(inp.to_model_input(), max_new_tokens=6)[0]
    return adapter.strip_response(said).text.strip()


def accuracy(adapter: LFM2AudioAdapter, utterances: Sequence[Utterance]) -> float:
    """Share of requests answered exactly right."""
    right = [answer_of(adapter, u.waveform) == u.request.answer for u in utterances]
    return float(np.mean(right))


# The aligner ---------------------------------------------------------------------------------


def new_aligner(folder: Path, seed: int) -> Any:
    """A fresh character-CTC ``ParakeetForCTC`` wrapped in a ForcedAligner: its
    convolutional front end only (log-mel features, 40 ms frames, about 150 ms
    of context), no attention layers. Attention would let the model emit a
    character far from where it is spoken (CTC does not care where); a local
    model cannot, which is what an aligner needs."""
    from transformers import (
        ParakeetCTCConfig,
        ParakeetFeatureExtractor,
        ParakeetForCTC,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2Processor,
    )

    from captum_mllm.audio import ForcedAligner

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(LETTERS)}))
    tokenizer = Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), word_delimiter_token="|")
    extractor = ParakeetFeatureExtractor(feature_size=64, sampling_rate=SAMPLE_RATE)
    encoder = dict(
        hidden_size=96, intermediate_size=192, num_hidden_layers=0, num_attention_heads=4,
        num_key_value_heads=4, num_mel_bins=64, subsampling_factor=4,
        subsampling_conv_channels=128, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, layerdrop=0.0, dropout_positions=0.0,
    )  # fmt: skip
    conf = ParakeetCTCConfig(encoder_config=encoder, vocab_size=len(LETTERS), pad_token_id=0)
    torch.manual_seed(seed)
    return ForcedAligner(
        ParakeetForCTC(conf), Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)
    )


def ctc_loss(aligner: Any, utterances: Sequence[Utterance], index: Sequence[int]) -> torch.Tensor:
    """Character CTC of the transcripts (no word delimiters: pauses are blanks)."""
    vocab = aligner.processor.tokenizer.get_vocab()
    waves = [utterances[i].waveform.numpy() for i in index]
    features = aligner.processor.feature_extractor(
        waves, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding=True
    )
    labels = [
        torch.tensor([vocab[c] for c in utterances[i].request.transcript.upper() if c != " "])
        for i in index
    ]
    y, _ = pad_rows(labels, fill=-100)
    return aligner.model(**features, labels=y).loss


def boundary_errors(aligner: Any, utterances: Sequence[Utterance]) -> np.ndarray:
    """Seconds between each aligned word boundary and the true pause (0 inside it),
    on utterances of words spoken alone and joined (their spans are known)."""
    errors = []
    for u in utterances:
        got = aligner.align(u.waveform, SAMPLE_RATE, u.request.transcript)
        true = u.spans
        errors.append(abs(got[0][0] - true[0][0]))
        errors.append(abs(got[-1][1] - true[-1][1]))
        for i in range(len(true) - 1):  # a cut anywhere in the pause is right
            cut, lo, hi = got[i][1], true[i][1], true[i + 1][0]
            errors.append(max(lo - cut, cut - hi, 0.0))
    return np.array(errors)


# Saving -------------------------------------------------------------------------------------


def save_model(model: Any, folder: Path) -> None:
    """float16 safetensors (the model is loaded back in float32)."""
    state = {
        k: v.detach().half().contiguous() if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def save_clips(
    utterances: Sequence[Utterance],
    folder: Path,
    index: str = "examples.json",
    stem: str = "request",
) -> None:
    """Example clips (16-bit WAV) and what each says (``index``)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, u in enumerate(utterances):
        name = f"{stem}_{i}.wav"
        sf.write(folder / name, u.waveform.clamp(-1, 1).numpy(), SAMPLE_RATE, subtype="PCM_16")
        rows.append(
            {
                "file": name,
                "transcript": u.request.transcript,
                "answer": u.request.answer,
                "deciding": list(u.request.deciding),
                "spans": [[round(float(s), 4), round(float(e), 4), w] for s, e, w in u.spans],
            }
        )
    (folder / index).write_text(json.dumps(rows, indent=1))


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(Path(__file__).parent / "weights"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clips", type=int, default=3000, help="training requests")
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--aligner-steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, help="keep the synthesised speech here")
    parser.add_argument("--workers", type=int, default=2, help="synthesis processes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "model").mkdir(parents=True)

    start = time.time()
    train = make_data(args.clips, args.seed, args.workers, args.cache)
    held_out = make_data(args.held_out, args.seed + 1, args.workers, args.cache)
    print(f"synthesised {len(train)} + {len(held_out)} requests in {time.time() - start:.0f} s")

    # The aligner first: its word spans let the model's training silence words
    # in whole sentences too, as the "silence" baseline does on aligned words.
    aligner = new_aligner(out / "aligner", args.seed)
    aligner.model.train()
    train_loop(
        aligner.model.parameters(),
        lambda idx: ctc_loss(aligner, train, idx),
        len(train),
        args.aligner_steps,
        args.batch_size,
        2e-3,
        args.seed,
        "aligner",
    )
    aligner.model.eval()
    aligner.model.save_pretrained(out / "aligner")
    aligner.processor.save_pretrained(out / "aligner")
    spanned = with_spans(train, aligner)

    model, processor = new_model(out / "model", args.seed)
    adapter = LFM2AudioAdapter(model.eval(), processor)
    data = Examples(
        adapter,
        train
        + words_left_out(spanned, args.seed)
        + deciding_left_out([u for u in train if u.spans], args.seed)
        + subsets_left_out([u for u in train if u.spans], args.seed),
    )
    model.train()
    trained = [p for n, p in model.named_parameters() if n.split(".")[0] in TRAINED]
    train_loop(
        trained,
        lambda idx: data.loss(model, idx),
        len(data.utterances),
        args.steps,
        args.batch_size,
        args.lr,
        args.seed,
        "model",
    )
    model.eval()
    save_model(model, out / "model")
    reloaded = LFM2AudioAdapter.from_pretrained(str(out / "model"), device="cpu")
    acc = accuracy(reloaded, held_out)
    print(f"held-out accuracy (saved weights): {acc:.3f}")

    joined = [u for u in held_out if u.spans]
    errors = boundary_errors(aligner, joined)
    print(
        f"aligner word-boundary error on {len(joined)} held-out clips: mean "
        f"{errors.mean() * 1000:.0f} ms, median {np.median(errors) * 1000:.0f} ms, "
        f"95th percentile {np.quantile(errors, 0.95) * 1000:.0f} ms"
    )
    save_clips(joined[:12], out / "clips")
    sentences = [u for u in held_out if not u.spans]  # spans unknown: the aligner finds them
    save_clips(sentences[:8], out / "clips", index="sentences.json", stem="sentence")
    figures = {
        "held_out_accuracy": acc,
        "n_held_out": len(held_out),
        "boundary_error_mean_ms": float(errors.mean() * 1000),
        "boundary_error_median_ms": float(np.median(errors) * 1000),
        "boundary_error_p95_ms": float(np.quantile(errors, 0.95) * 1000),
        "seconds": time.time() - start,
    }
    recipe = {k: v for k, v in vars(args).items() if k not in ("out", "cache")}
    (out / "training.json").write_text(json.dumps({**recipe, **figures}, indent=1))
    print(f"done in {figures['seconds']:.0f} s: {out}")
    return figures


TRAINED = ("conformer", "audio_adapter", "lfm")  # the text path; audio output stays as seeded


if __name__ == "__main__":
    main()
