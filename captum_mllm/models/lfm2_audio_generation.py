"""Batched greedy / sampled generation for LFM2-Audio.

liquid-audio's ``generate_sequential`` and ``generate_interleaved`` run one
chat at a time; this runs their exact step logic over a left-padded batch of
coalitions (transformers' Lfm2 masks padding in its convolutions too, so the
tokens and frames are the same as one chat at a time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from captum_mllm.models.batching import pad_rows, with_rows
from captum_mllm.models.sampling import pick_tokens

if TYPE_CHECKING:
    from captum_mllm.models.lfm2_audio import LFM2AudioAdapter

IM_END, AUDIO_START, TEXT_END = 7, 128, 130
END_OF_AUDIO = 2048


class BatchedGeneration:
    """liquid-audio's two generators, run over a left-padded batch.

    Per row it keeps the generator's state (current modality, items left in
    the current interleaved run, text done, finished); finished rows keep
    stepping with their outputs ignored.
    """

    def __init__(
        self,
        adapter: LFM2AudioAdapter,
        rows: list[Tensor],
        mode: str,
        sampling: dict[str, tuple[float | None, int | None]],
        generators: list[torch.Generator] | None = None,
    ) -> None:
        self.a = adapter
        self.m: Any = adapter.model
        self.mode = mode
        self.sampling = sampling
        self.generators = generators  # one per row: a row's samples never depend on others
        self.x, self.mask = pad_rows(rows, left=True)
        self.n = len(rows)
        conf = self.m.conf
        self.n_text, self.n_audio = conf.interleaved_n_text, conf.interleaved_n_audio

    def run(self, max_new_tokens: int) -> list[Tensor]:
        lfm = self.a._lfm
        audio = [False] * self.n  # current modality is audio
        left = [self.n_text] * self.n
        text_done = [False] * self.n
        done = [False] * self.n
        out: list[list[list[int]]] = [[] for _ in range(self.n)]
        x, mask = self.x, self.mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = None
        with torch.no_grad():
            for _ in range(max_new_tokens):
                key = self.a._cache_kwarg
                kwargs: dict[str, Any] = {key: cache} if cache is not None else {}
                res = lfm(
                    inputs_embeds=x, attention_mask=mask, position_ids=positions,
                    use_cache=True, **kwargs,
                )  # fmt: skip
                cache = getattr(res, key)
                h = res.last_hidden_state[:, -1]
                text_next = self._text_tokens(h)
                frames = self._audio_frames(h) if any(audio) else None
                next_emb = []
                for b in range(self.n):
                    emb, item = self._step(b, audio, left, text_done, done, text_next, frames)
                    if item is not None:
                        out[b].append(item)
                    next_emb.append(emb)
                if all(done):
                    break
                x = torch.stack(next_emb)[:, None]
                mask = torch.cat([mask, mask.new_ones(self.n, 1)], dim=1)
                positions = positions[:, -1:] + 1
        return [torch.tensor(r, dtype=torch.long).reshape(-1, 9) for r in out]

    def _step(
        self,
        b: int,
        audio: list[bool],
        left: list[int],
        text_done: list[bool],
        done: list[bool],
        text_next: Tensor,
        frames: Tensor | None,
    ) -> tuple[Tensor, list[int] | None]:
        """One generator step of row ``b``: (next input embedding, emitted item)."""
        m = self.m
        if done[b]:
            return self.x.new_zeros(self.x.shape[-1]), None
        interleaved = self.mode == "text+audio"
        if interleaved:
            left[b] -= 1
        if not audio[b]:
            token = int(text_next[b])
            if interleaved and token == IM_END:
                done[b] = True
                return self.x.new_zeros(self.x.shape[-1]), None
            if self.mode == "text" and token == AUDIO_START:
                done[b] = True  # text only: stop where audio would begin
                return self.x.new_zeros(self.x.shape[-1]), None
            if interleaved:
                if token == TEXT_END:
                    text_done[b] = True
                if not left[b] or text_done[b]:
                    audio[b], left[b] = True, self.n_audio
            else:
                if token == AUDIO_START:
                    audio[b] = True
                if token == IM_END:
                    done[b] = True
            emb = self.a._lfm.embed_tokens(text_next[b : b + 1])[0]
            return emb, [token] + [-1] * 8
        assert frames is not None
        frame = frames[b].clone()
        if interleaved and not left[b] and not text_done[b]:
            audio[b], left[b] = False, self.n_text
        if int(frame[0]) == END_OF_AUDIO:
            frame[:] = END_OF_AUDIO
            audio[b] = False
        emb = m.audio_embedding(frame + m.codebook_offsets).sum(0)
        return emb, [-1] + frame.tolist()

    def _text_tokens(self, h: Tensor) -> Tensor:
        # enough rows for the head's product, as for the nn.Linear layers (enough_rows)
        logits = nn.functional.linear(with_rows(h), self.a._lfm.embed_tokens.weight)[: len(h)]
        temperature, top_k = self.sampling["text"]
        return pick_tokens(logits, temperature, top_k, self.generators)

    def _audio_frames(self, h: Tensor) -> Tensor:
        """Depthformer over the codebooks for every row at once: ``(B, C)``."""
        m = self.m
        depth_in = m.depth_linear(h).reshape(len(h), m.codebooks, m.depthformer_dim)
        token = torch.zeros_like(depth_in[:, 0])
        cache = None
        codes = []
        temperature, top_k = self.sampling["audio"]
        for i in range(m.codebooks):
            out, cache = m.depthformer.forward_cached((depth_in[:, i] + token)[:, None], cache)
            logits = m.depth_embeddings[i].get_logits(out[:, 0])
            nxt = pick_tokens(logits, temperature, top_k, self.generators)
            codes.append(nxt)
            token = m.depth_embeddings[i](nxt)
        return torch.stack(codes, 1)
