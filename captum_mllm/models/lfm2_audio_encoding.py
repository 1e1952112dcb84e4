"""LFM2-Audio's chat format and input embeddings: a chat laid out as
liquid-audio's ``ChatState`` lays it out (each clip through the conformer once),
and each coalition's rows of vectors, with the baselines' fills and silenced
clips (see :class:`~captum_mllm.models.lfm2_audio.LFM2AudioAdapter`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from captum_mllm.audio import resample
from captum_mllm.chat import AudioPart, Chat, as_chat
from captum_mllm.encoding import EncodedChat, MaskedChat, PositionTableBuilder
from captum_mllm.errors import AudioError, InvalidContentError, InvalidRoleError
from captum_mllm.models.batching import indices_on, lengths, to_device
from captum_mllm.models.decoder import DecoderLMAdapter

SAMPLE_RATE = 16_000
FRAME_SECONDS = 0.08  # one LFM position after the conformer's 8x subsampling of 10 ms frames


@dataclass
class _Clip:
    """One audio part: its 16 kHz samples and where its positions are."""

    waveform: Tensor
    first: int  # first model position
    n_positions: int


def _first_of_token(input_ids: Tensor, is_audio: Tensor) -> Tensor:
    """``(L,)``: each position's id into the chat's vectors, the first
    position holding its text token (equal tokens, equal vectors); an audio
    position its own."""
    ids = torch.arange(len(input_ids))
    text = ids[~is_audio]
    _, first, inverse = np.unique(input_ids[text].numpy(), return_index=True, return_inverse=True)
    ids[text] = text[torch.from_numpy(first[inverse])]
    return ids


def gather_rows(rows: list[Tensor], table: Tensor) -> list[Tensor]:
    """Rows of ids into ``table`` -> rows of its vectors (views of one gather)."""
    if not rows:
        return []
    return list(table[to_device(torch.cat(rows), table.device)].split(lengths(rows)))


class LFM2AudioEncoding(DecoderLMAdapter):
    """The LFM2-Audio adapter's chat layout and input embeddings."""

    model: Any  # liquid-audio's LFM2AudioModel (untyped)
    processor: Any
    n_encoder_calls: int

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def _lfm(self) -> Any:
        return self.model.lfm

    # Encoding --------------------------------------------------------------------

    def encode(self, chat: Chat | Sequence[Any]) -> EncodedChat:
        """Lay the chat out as LFM2-Audio reads it and encode each clip once.

        ``<|startoftext|>``, then per turn ``<|im_start|>role\\n`` + parts (audio
        positions, text tokens) + ``<|im_end|>\\n``, then ``<|im_start|>assistant\\n``.

        Args:
            chat (Chat or list of dict): the chat.

        Returns:
            EncodedChat: the position table; ``state`` holds the input
            embeddings of every position and the clips.
        """
        chat = as_chat(chat)
        self.check_text(chat)
        for turn in chat:  # liquid-audio's chat format has neither: they would go unread
            if turn.role == "tool":
                raise InvalidRoleError(
                    "LFM2-Audio's chat format has system, user and assistant turns: give a "
                    "tool's output in a user turn"
                )
            if turn.extra:
                raise InvalidContentError(
                    f"LFM2-Audio's chat format reads a turn's role and content, not "
                    f"{sorted(turn.extra)}"
                )
        table = PositionTableBuilder()
        pieces: list[Tensor] = []  # (n, D) embeddings, in position order
        clips: list[_Clip] = []
        table.add_text(self._tokenize("<|startoftext|>"), -1, -1)
        for ti, turn in enumerate(chat):
            table.add_text(self._tokenize(f"<|im_start|>{turn.role}\n"), ti, -1)
            for pi, part in enumerate(turn.parts):
                if isinstance(part, AudioPart):
                    wave = self._prepare(part)
                    embeds = self.encode_audio(wave)
                    clips.append(_Clip(wave, len(table), len(embeds)))
                    table.add_audio(
                        len(embeds), ti, pi, len(clips) - 1, len(wave) / SAMPLE_RATE, FRAME_SECONDS
                    )
                    pieces.append(embeds)
                else:
                    table.add_text(self._tokenize(part.text, offsets=True), ti, pi, part.text)
            table.add_text(self._tokenize("<|im_end|>\n"), ti, -1)
        table.add_text(self._tokenize("<|im_start|>assistant\n"), -1, -1)

        encoded = table.build([t.role for t in chat], self.tokenizer)
        embeds = self._embed_text(encoded.input_ids.clamp(min=0))
        assert encoded.clip is not None
        is_audio = encoded.clip >= 0
        if pieces:
            embeds[is_audio] = torch.cat(pieces).to(embeds.dtype)
        encoded.state = {"embeds": embeds, "clips": clips}
        return encoded

    def _tokenize(self, text: str, offsets: bool = False) -> Any:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
        return enc

    def _prepare(self, part: AudioPart) -> Tensor:
        wave = resample(part.waveform, part.sample_rate, SAMPLE_RATE)
        if len(wave) < FRAME_SECONDS * SAMPLE_RATE:
            raise AudioError(
                f"audio clip of {part.duration:.3f} s is shorter than one 80 ms model position"
            )
        return wave

    def encode_audio(self, wave: Tensor) -> Tensor:
        """16 kHz samples -> ``(n_positions, D)`` LFM input embeddings (one
        conformer call), as liquid-audio's ``ChatState.add_audio`` + ``_prefill``."""
        device = self.device
        with torch.no_grad():
            wave = wave.to(device)[None]
            mel, _ = self.processor.audio(wave, torch.tensor([wave.shape[1]], device=device))
            mel_len = torch.tensor([mel.shape[-1]], device=device)  # as ChatState: all frames
            enc, enc_len = self.model.conformer(mel.to(self.dtype), mel_len)
            embeds = self.model.audio_adapter(enc.mT[0, : int(enc_len[0])])
        self.n_encoder_calls += 1
        return embeds

    def _embed_text(self, ids: Tensor) -> Tensor:
        with torch.no_grad():
            return self._lfm.embed_tokens(ids.to(self.device)).clone()

    def _embed_items(self, items: Tensor) -> Tensor:
        """``(N, 9)`` output items (best given on the host: which are audio is
        read there) -> ``(N, D)`` input embeddings."""
        host = items.cpu()
        out = self._embed_text(to_device(host[:, 0].clamp(min=0), self.device))
        audio = host[:, 0] < 0
        if bool(audio.any()):
            at = indices_on(audio, self.device)
            codes = to_device(host[audio, 1:], self.device) + self.model.codebook_offsets
            with torch.no_grad():
                out[at] = self.model.audio_embedding(codes).sum(1).to(out.dtype)
        return out

    # Coalitions -> input embeddings ------------------------------------------------------

    def _masked_ids(self, masked: MaskedChat) -> tuple[list[Tensor], Tensor]:
        """Each coalition as a host row of ids ``(L_b,)`` into one table of the
        vectors the batch reads ``(U, D)``: the chat's positions, then the
        baselines' fills and silenced clips. Equal ids are equal vectors (a text
        position reads the first position of its token), so the packed forward
        finds the rows that begin alike from the ids alone: the coalitions are
        laid out on the host, and nothing is read back from the accelerator.

        Returns:
            tuple: B id rows, and the table (on the model's device).
        """
        enc = masked.encoded
        base = enc.state["embeds"]
        assert enc.clip is not None
        is_audio = enc.clip.cpu() >= 0
        present = masked.present.cpu()
        ids = _first_of_token(enc.input_ids.cpu(), is_audio).expand(len(present), -1).clone()
        keep = present.clone()
        extra: list[Tensor] = []  # (n, D) vectors after the chat's positions, in order

        def add(vectors: Tensor) -> int:
            extra.append(vectors.to(base))
            return len(base) + sum(len(e) for e in extra[:-1])

        absent_text = ~present & ~is_audio
        absent_audio = ~present & is_audio
        if masked.baseline == "replace" and bool(absent_text.any()):
            keep |= absent_text
            ids[absent_text] = add(self._embed_text(torch.tensor([masked.replace_id])))
        if masked.audio_baseline != "drop" and bool(absent_audio.any()):
            keep |= absent_audio
            if masked.audio_baseline == "embedding":
                fill = base.new_zeros(()) if masked.audio_fill is None else masked.audio_fill
                ids[absent_audio] = add(fill.to(base).expand(base.shape[-1])[None])
            else:
                placed: dict[tuple[int, bytes], int] = {}  # silenced clip -> its first id
                for b in absent_audio.any(1).nonzero()[:, 0].tolist():
                    for span, key, vectors in self._silenced(enc, absent_audio[b]):
                        if key not in placed:
                            placed[key] = add(vectors)
                        ids[b, span] = placed[key] + torch.arange(span.stop - span.start)
        rows = list(ids[keep].split(keep.sum(1).tolist()))
        return rows, torch.cat([base, *extra]) if extra else base

    def _masked_embeds(self, masked: MaskedChat) -> list[Tensor]:
        """Input embeddings of each coalition: ``B`` tensors ``(L_b, D)``."""
        rows, table = self._masked_ids(masked)
        return gather_rows(rows, table)

    def _silenced(
        self, enc: EncodedChat, absent: Tensor
    ) -> list[tuple[slice, tuple[int, bytes], Tensor]]:
        """The clips of one coalition with absent positions, each with its
        samples under them zeroed and re-encoded: its positions, a key and
        its embeddings, encoded once per distinct silenced clip of this chat
        (cached in its state)."""
        assert enc.audio_time is not None
        silenced = enc.state.setdefault("silenced", {})
        out = []
        for ci, clip in enumerate(enc.state["clips"]):
            span = slice(clip.first, clip.first + clip.n_positions)
            off = absent[span]
            if not bool(off.any()):
                continue
            key = (ci, off.numpy().tobytes())
            if key not in silenced:
                wave = clip.waveform.clone()
                for t0, t1 in enc.audio_time[span][off].tolist():
                    wave[round(t0 * SAMPLE_RATE) : round(t1 * SAMPLE_RATE)] = 0.0
                silenced[key] = self.encode_audio(wave)
            out.append((span, key, silenced[key]))
        return out
