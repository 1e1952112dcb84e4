"""Adapter for LiquidAI's LFM2-Audio (liquid-audio's LFM2AudioModel + processor).

Everything model-specific lives here: the chat format and the conformer that
turns 16 kHz audio into one LFM position per 80 ms (in
:mod:`~captum_mllm.models.lfm2_audio_encoding`), the depthformer that scores
audio frames of 8 Mimi codebooks, and a batched version of liquid-audio's
``generate_sequential`` / ``generate_interleaved`` (in
:mod:`~captum_mllm.models.lfm2_audio_generation`).

A :class:`~captum_mllm.models.base.Response` of this adapter holds ``(N, 9)``
long ids, one row per output item: column 0 a text token id (or -1 for an audio
frame), columns 1..8 the frame's codes (or -1 for a text token). No other
module reads that layout. Plain ``(T,)`` text ids are accepted as targets too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from captum_mllm.encoding import EncodedChat, MaskedChat
from captum_mllm.errors import EmptyCoalitionError, InvalidOptionError, TargetError, warn_caller
from captum_mllm.models.base import Response, token_labels
from captum_mllm.models.batching import (
    indices_on,
    ints,
    lengths,
    pad_rows,
    target_log_probs,
    to_device,
    widened,
    with_rows,
)
from captum_mllm.models.decoder import resolve_device, without_cudnn_attention
from captum_mllm.models.lfm2_audio_encoding import FRAME_SECONDS, LFM2AudioEncoding, gather_rows
from captum_mllm.models.lfm2_audio_generation import END_OF_AUDIO, IM_END, BatchedGeneration
from captum_mllm.models.packing import PackedRows, distinct_ids
from captum_mllm.models.prefix_cache import PrefixCache, cache_kwarg
from captum_mllm.models.sampling import row_generators

MODES = ("text", "audio", "text+audio")


def as_items(target: Tensor) -> Tensor:
    """``(T,)`` text ids or ``(N, 9)`` items -> ``(N, 9)`` items."""
    if target.dim() == 2:
        return target
    items = torch.full((len(target), 9), -1, dtype=torch.long, device=target.device)
    items[:, 0] = target
    return items


class _KernelAdvice(logging.Filter):
    """Drops transformers' advice to install ``causal_conv1d`` ("much slower"
    without it), which it gives wherever LFM2 runs: that kernel is CUDA's only,
    so on a machine without CUDA the advice cannot be followed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "causal_conv1d" not in record.getMessage()


def _quiet_kernel_advice() -> None:
    logger = logging.getLogger("transformers.integrations.hub_kernels")
    if not any(isinstance(f, _KernelAdvice) for f in logger.filters):
        logger.addFilter(_KernelAdvice())


class LFM2AudioAdapter(LFM2AudioEncoding):
    """LFM2-Audio behind the adapter contract of :mod:`captum_mllm.models.base`.

    Each audio clip is encoded by the conformer once per chat (in
    :meth:`encode`); only the ``"silence"`` baseline re-encodes, once per
    distinct silenced clip.

    Args:
        model (LFM2AudioModel): liquid-audio's model.
        processor (LFM2AudioProcessor): its processor (tokenizer + mel features).

    Examples::

        >>> model = LFM2AudioAdapter.from_pretrained("LiquidAI/LFM2-Audio-1.5B", device="cuda")
        >>> chat = Chat().system("Respond briefly.").user("What is asked?", audio="q.wav")
        >>> inp = ChatInput(chat, model, audio_unit=0.5)
    """

    def __init__(self, model: nn.Module, processor: Any) -> None:
        super().__init__()
        self.model: Any = model  # liquid-audio's modules are untyped
        self.processor = processor
        self.tokenizer = processor.text
        self.n_encoder_calls = 0
        self._failed_decoders: set[str] = set()  # not retried: each try rebuilds a detokenizer
        self._cache_kwarg = cache_kwarg(model.lfm.forward)  # type: ignore[union-attr]
        if not torch.cuda.is_available():
            _quiet_kernel_advice()

    @classmethod
    def from_pretrained(
        cls,
        repo_or_path: str,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> LFM2AudioAdapter:
        """Load LFM2-Audio and its processor (Hugging Face hub id or local folder).

        Args:
            repo_or_path (str): e.g. ``"LiquidAI/LFM2-Audio-1.5B"``.
            device (str or torch.device, optional): Default: the first GPU when
                there is one, else the CPU
            dtype (torch.dtype, optional): Default: bfloat16 on a GPU, float32 on the CPU

        Returns:
            LFM2AudioAdapter: the adapter, in eval mode.
        """
        from liquid_audio import LFM2AudioModel, LFM2AudioProcessor

        device = resolve_device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

        # liquid-audio reads a Path as a local folder and a str as a hub id.
        source: str | Path = Path(repo_or_path) if Path(repo_or_path).is_dir() else repo_or_path
        model = LFM2AudioModel.from_pretrained(source, device=device, dtype=dtype)
        processor = LFM2AudioProcessor.from_pretrained(source, device=device)
        return cls(model.eval(), processor.eval())

    @without_cudnn_attention
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def held_modules(self) -> list[nn.Module]:
        """The adapter, and the processor's mel front end (not a module of the
        adapter): in training mode it dithers every clip with random noise."""
        audio = getattr(self.processor, "audio", None)
        return [self, audio] if isinstance(audio, nn.Module) else [self]

    # Scoring ---------------------------------------------------------------------

    @without_cudnn_attention
    def prefill(self, masked: MaskedChat) -> PrefixCache | None:
        """Run the positions no feature touches (system turn, template) once and
        keep the backbone's hybrid cache: key/value of its attention layers and
        the convolution states of the others, expanded over each batch."""
        if masked.prefix_len == 0:
            return None
        embeds = masked.encoded.state["embeds"][: masked.prefix_len]
        with torch.inference_mode():
            out = self._lfm(inputs_embeds=embeds[None], use_cache=True)
        self.n_forward_calls += 1
        cache = getattr(out, self._cache_kwarg, None)
        if not PrefixCache.expandable(cache):
            return None
        return PrefixCache(masked.prefix_len, cache, out.last_hidden_state[0, -1])

    def score_masked(
        self,
        masked: MaskedChat,
        response: Response,
        prefix: Any = None,
        per_step: bool = False,
    ) -> Tensor:
        """As the base adapter's; the rows are ids into the batch's vectors
        (:meth:`_masked_ids`), built on the host, unless ``per_step`` grows
        them with the answer's."""
        if per_step:
            return super().score_masked(masked, response, prefix, per_step)
        rows, table = self._masked_ids(masked)
        if prefix is not None:
            rows = [r[prefix.length :] for r in rows]
        return self.score_rows(rows, response, prefix, table=table)

    def _coalition_rows(self, masked: MaskedChat, prefix: Any) -> list[Tensor]:
        rows = self._masked_embeds(masked)
        return rows if prefix is None else [r[prefix.length :] for r in rows]

    def _fed(self, response: Response) -> Tensor:
        return self._embed_items(response.ids)

    def input_embeddings(self, encoded: EncodedChat) -> Tensor:
        """``(L, D)``: text token embeddings and, at audio positions, the audio
        adapter's output (what the LFM backbone reads)."""
        return encoded.state["embeds"].detach()

    def attention_inputs(
        self, encoded: EncodedChat, response: Response
    ) -> tuple[nn.Module, dict[str, Tensor]]:
        """The LFM backbone, reading the prompt's embeddings (audio positions: the
        audio adapter's output) and the answer's items but its last."""
        fed = self._embed_items(response.ids[:-1])
        embeds = self.input_embeddings(encoded).to(fed)
        return self._lfm, {"inputs_embeds": torch.cat([embeds, fed])[None]}

    @without_cudnn_attention
    def next_token_log_probs(self, embeds: Tensor, response: Response, token: int) -> Tensor:
        """``(B,)``: one backbone forward from ``inputs_embeds``, differentiable in ``embeds``."""
        items = response.ids.to(self.device)
        fed = self._embed_items(items[:token])
        x = torch.cat([embeds, fed[None].expand(len(embeds), -1, -1).to(embeds.dtype)], 1)
        hidden = self._lfm(inputs_embeds=x, use_cache=False).last_hidden_state[:, -1:]
        self.n_forward_calls += 1
        return self._item_log_probs(hidden, items[token : token + 1])[:, 0]

    @without_cudnn_attention
    def response_log_prob(self, embeds: Tensor, response: Response) -> Tensor:
        """``(B,)``: every response item scored after one backbone forward."""
        items = response.ids.to(self.device)
        fed = self._embed_items(items[:-1])
        x = torch.cat([embeds, fed[None].expand(len(embeds), -1, -1).to(embeds.dtype)], 1)
        start = embeds.shape[1] - 1  # the last prompt position predicts the first item
        hidden = self._lfm(inputs_embeds=x, use_cache=False).last_hidden_state[:, start:]
        self.n_forward_calls += 1
        return self._item_log_probs(hidden, items).sum(1)

    def _score_rows(
        self,
        rows: list[Tensor],
        response: Response,
        first: int,
        last: int,
        prefix: Any,
        feed_all: bool = False,
        table: Tensor | None = None,
    ) -> Tensor:
        """Text items are scored by the tied LM head; an audio frame by the
        depthformer over its 8 codebooks (codebook 0 only at end-of-audio).
        The rows are vectors, or ids into ``table`` when it is given."""
        items = response.ids[first:last]
        fed = self._embed_items(items[:-1])  # the last item predicts nothing we need
        sizes = lengths(rows)
        if prefix is None and 0 in sizes:
            raise EmptyCoalitionError(
                "a coalition removed every input position; keep some template text fixed"
            )
        with torch.inference_mode():
            if self.packs():
                h = self._packed_hidden(rows, fed, prefix, len(items), table)
            else:
                vectors = rows if table is None else gather_rows(rows, table)
                h = self._padded_hidden(vectors, fed, prefix, len(items))
            self.n_forward_calls += 1
            if prefix is not None and 0 in sizes:  # nothing after the prefix
                h[to_device(ints(sizes) == 0, h.device), 0] = prefix.last.to(h.dtype)
            return self._item_log_probs(h, items)

    def _packing_probe(self) -> tuple[Tensor, Tensor] | None:
        """Rows of text token embeddings, as the backbone reads them."""
        table = self._lfm.embed_tokens
        rows = [table(torch.arange(1, n + 1, device=self.device)) for n in (3, 9, 20)]
        fed = rows[0][:2]
        out = self._lfm(
            inputs_embeds=table(torch.arange(5, 9, device=self.device))[None], use_cache=True
        )
        cache = getattr(out, self._cache_kwarg, None)
        prefixes: list[PrefixCache | None] = [None]
        if PrefixCache.expandable(cache):
            prefixes.append(PrefixCache(4, cache, out.last_hidden_state[0, -1]))
        packed = [self._packed_hidden(rows, fed, p, 3) for p in prefixes]
        padded = [self._padded_hidden(rows, fed, p, 3) for p in prefixes]
        return torch.cat(packed), torch.cat(padded)

    def _padded_hidden(self, rows: list[Tensor], fed: Tensor, prefix: Any, n_items: int) -> Tensor:
        """Backbone states ``(B, N, D)`` that predict the ``N = n_items`` items,
        of one right-padded forward of the rows (each followed by ``fed``)."""
        device = self.device
        lens = to_device(ints(lengths(rows)), device)
        dim = rows[0].shape[-1]
        x, mask = widened(*pad_rows(rows, device=device, suffix=fed))
        kwargs: dict[str, Any] = {"use_cache": False}
        if prefix is not None:
            kwargs = {"use_cache": True, self._cache_kwarg: prefix.expand(len(rows))}
            mask = torch.cat([mask.new_ones(len(rows), prefix.length), mask], dim=1)
        hidden = self._lfm(inputs_embeds=x, attention_mask=mask, **kwargs).last_hidden_state
        index = (lens - 1)[:, None] + torch.arange(n_items, device=device)[None]
        return hidden.gather(1, index.clamp(min=0)[..., None].expand(-1, -1, dim))

    def _packed_hidden(
        self,
        rows: list[Tensor],
        fed: Tensor,
        prefix: Any,
        n_items: int,
        table: Tensor | None = None,
    ) -> Tensor:
        """As :meth:`_padded_hidden`, the rows (vectors, or ids into ``table``)
        packed into one forward (:mod:`~captum_mllm.models.packing`; rows that
        begin with the same vectors share those positions)."""
        if table is None:  # rows of vectors: ids of the distinct ones, found on the device
            rows, table = distinct_ids(rows)
        suffix = torch.arange(len(table), len(table) + len(fed))  # the answer's vectors once
        table = torch.cat([table, fed.to(table.dtype)])
        cached = 0 if prefix is None else prefix.length
        layout, packed = PackedRows.of(rows, cached, device=self.device, suffix=suffix)
        hidden = self._packed_forward(self._lfm, layout, prefix, inputs_embeds=table[packed])
        hidden = hidden.last_hidden_state
        at = layout.predicting(lengths(rows), n_items)
        return hidden[0][to_device(at, hidden.device)]

    def _item_log_probs(self, h: Tensor, items: Tensor) -> Tensor:
        """Hidden states ``(B, N, D)`` that predict ``items`` -> ``(B, N)`` log-probs.
        Which items are text is read on the host (``items`` are best given
        there): nothing here waits for the accelerator."""
        batch, n_items, _ = h.shape
        out = torch.zeros(batch, n_items, device=h.device)
        host = items.cpu()
        on_device = to_device(host, h.device)
        text = host[:, 0] >= 0
        if bool(text.any()):
            at = indices_on(text, h.device)
            states = h.index_select(1, at).reshape(batch * len(at), -1)
            logits = with_rows(states) @ self._lfm.embed_tokens.weight.T
            logits = logits[: len(states)].reshape(batch, len(at), -1)
            out[:, at] = target_log_probs(logits, on_device[at, 0])
        if not bool(text.all()):
            at = indices_on(~text, h.device)
            codes = on_device[at, 1:]  # (F, C)
            frames = h.index_select(1, at).reshape(-1, h.shape[-1])  # (B * F, D)
            codes_b = codes.repeat(batch, 1)
            per_code = self._depth_log_probs(frames, codes_b)  # (B * F, C)
            # At end-of-audio only codebook 0 is predicted (the rest are copies).
            eoa = codes_b[:, :1] == END_OF_AUDIO
            per_code = torch.cat([per_code[:, :1], per_code[:, 1:].masked_fill(eoa, 0.0)], 1)
            out[:, at] = per_code.sum(-1).reshape(batch, -1)
        return out

    def _depth_log_probs(self, frames: Tensor, codes: Tensor) -> Tensor:
        """Teacher-forced depthformer, as liquid-audio's ``logits``: ``(M, C)``."""
        m = self.model
        n_cb, dim = m.codebooks, m.depthformer_dim
        n_frames = len(frames)  # padded to enough rows for every product (MIN_PRODUCT_ROWS)
        frames, codes = with_rows(frames), with_rows(codes)
        depth_in = m.depth_linear(frames).reshape(len(frames), n_cb, dim)
        prev = torch.stack([m.depth_embeddings[i](codes[:, i]) for i in range(n_cb)], 1)
        prev[:, -1] = 0
        depth_in = depth_in + prev.roll(1, 1)
        out = m.depthformer(depth_in)
        logp = [
            m.depth_embeddings[i].get_logits(out[:, i]).float().log_softmax(-1) for i in range(n_cb)
        ]
        return torch.stack(
            [lp.gather(1, codes[:, i : i + 1])[:, 0] for i, lp in enumerate(logp)], 1
        )[:n_frames]

    # Generation ------------------------------------------------------------------

    def _generate(
        self,
        masked: MaskedChat,
        seeds: list[int] | None = None,
        max_new_tokens: int = 25,
        output_modality: str = "text",
        do_sample: bool = False,
        temperature: float | None = None,
        top_k: int | None = None,
        audio_temperature: float | None = None,
        audio_top_k: int | None = None,
        **unknown: Any,
    ) -> list[Response]:
        """Continue each coalition, batched with left padding.

        ``"text"`` and ``"audio"`` follow liquid-audio's ``generate_sequential``
        (``"text"`` stops before any audio frame), ``"text+audio"`` its
        ``generate_interleaved``; greedy unless ``do_sample``, each row then
        sampled from its own generator seeded by ``seeds[b]``: text tokens
        with a ``temperature``, audio frames with an ``audio_temperature``
        (each greedy without one, as liquid-audio's samplers).

        Returns:
            list of Response: one per coalition.
        """
        unknown = {
            k: v for k, v in unknown.items() if v is not None
        }  # None: unset (Captum's top_p)
        if unknown:  # rather than generate on defaults the caller did not mean
            raise InvalidOptionError(
                f"LFM2-Audio's generation takes max_new_tokens, output_modality, do_sample, "
                f"temperature, top_k, audio_temperature and audio_top_k; not {sorted(unknown)}"
            )
        if output_modality not in MODES:
            raise InvalidOptionError(
                f"output_modality must be one of {MODES}, got {output_modality!r}"
            )
        sampling = {
            "text": (temperature if do_sample else None, top_k if do_sample else None),
            "audio": (audio_temperature if do_sample else None, audio_top_k if do_sample else None),
        }
        rows = self._masked_embeds(masked)
        generators = row_generators(seeds, self.device) if do_sample else None
        run = BatchedGeneration(self, rows, output_modality, sampling, generators)
        items = run.run(max_new_tokens)
        self.n_forward_calls += 1
        return [self.response(r, waveform=False) for r in items]  # see response()

    # Responses -----------------------------------------------------------------------

    def response(self, ids: Tensor, waveform: bool = True) -> Response:
        """Output items ``(N, 9)`` (or text ids ``(T,)``) as a response: text
        tokens and 80 ms audio frames (``♪0.08s`` ...), and the spoken part's
        codes and waveform (when the processor has detokenizer or Mimi weights).

        Args:
            ids (Tensor): the items.
            waveform (bool, optional): decode the codes to a waveform.
                :meth:`generate_masked` does not: each coalition's answer is
                compared by its tokens, and decoding each one cost a decoder
                call per coalition. Default: True
        """
        items = as_items(ids.long())
        text_ids = items[items[:, 0] >= 0, 0]
        words = iter(token_labels(self.tokenizer.decode, text_ids, _pretty))
        labels, frame = [], 0
        for row in items.tolist():
            if row[0] >= 0:
                labels.append(next(words))
            else:
                frame += 1
                labels.append(f"♪{frame * FRAME_SECONDS:.2f}s")
        text = self.tokenizer.decode(text_ids)
        frames = int((items[:, 0] < 0).sum())
        text += f" [♪ {frames} frames]" if frames else ""
        audio = self._audio(items, waveform)
        return Response(ids=items, labels=tuple(labels), text=text, audio=audio)

    def _audio(self, items: Tensor, waveform: bool) -> dict[str, Any] | None:
        codes = items[(items[:, 0] < 0) & (items[:, 1] < END_OF_AUDIO), 1:].T.contiguous()
        if codes.numel() == 0:
            return None
        wave = self._waveform(codes) if waveform else None
        return {"codes": codes.cpu(), "waveform": wave, "sample_rate": 24_000}

    def _waveform(self, codes: Tensor) -> Tensor | None:
        """The 24 kHz waveform of ``(8, T)`` codes, as liquid-audio decodes them:
        LFM2.5-Audio's detokenizer (``processor.decode``), else Mimi (the only
        decoder LFM2-Audio-1.5B ships); None when the processor has the weights
        of neither (tiny test models), with a warning when a decoder failed."""
        batch = codes[None].to(self.device)
        decoders = {  # name, the processor's weights path, decode
            "processor.decode": ("detokenizer_path", lambda: self.processor.decode(batch)[0]),
            "processor.mimi.decode": (
                "mimi_weights_path",
                lambda: self.processor.mimi.decode(batch)[0, 0],
            ),
        }
        failures, waveform = [], None
        for name, (weights, decode) in decoders.items():
            if getattr(self.processor, weights, "") is None or name in self._failed_decoders:
                continue  # this model ships no such weights, or they failed on this machine
            try:
                with torch.no_grad():
                    waveform = decode().float().cpu()
                break
            except Exception as e:  # e.g. the detokenizer moves itself to CUDA
                self._failed_decoders.add(name)
                failures.append(f"{name}: {type(e).__name__}: {e}")
        if failures:  # another decoder's sound, or none, and no word why
            decoded = f"decoded by {name} instead" if waveform is not None else "no waveform"
            warn_caller(
                f"the answer's audio codes could not be decoded ({'; '.join(failures)}): "
                f"{decoded}, here and for later answers (Response.audio['codes'] holds the codes)"
            )
        return waveform

    @property
    def vocab_size(self) -> int:
        return int(self._lfm.embed_tokens.num_embeddings)

    @property
    def hidden_size(self) -> int:
        return int(self._lfm.config.hidden_size)

    @property
    def max_positions(self) -> int | None:
        return int(self._lfm.config.max_position_embeddings)

    def check_target(self, target: Tensor) -> Response:
        """A user-given target: ``(T,)`` / ``(1, T)`` text ids, or ``(N, 9)`` output
        items (text rows ``[id, -1 x 8]``, audio frames ``[-1, 8 codes]``).

        Raises:
            TargetError: another shape or dtype, or ids or codes out of range.
        """
        is_items = target.dim() == 2 and target.shape[1] == 9 and bool((target == -1).any())
        if not is_items:
            return super().check_target(target)
        if target.is_floating_point():
            raise TargetError(f"target items must be integers, got {target.dtype}")
        text, codes = target[:, 0], target[:, 1:]
        audio = text < 0
        ok_text = ((text >= 0) & (text < self.vocab_size) & (codes == -1).all(1)) | audio
        ok_audio = (text == -1) & (codes >= 0).all(1) & (codes <= END_OF_AUDIO).all(1)
        if not bool((ok_text & (~audio | ok_audio)).all()):
            raise TargetError(
                "target items must be text rows [id, -1 x 8] with ids in the vocabulary or "
                f"audio frames [-1, 8 codes in 0..{END_OF_AUDIO}]"
            )
        return self.response(target)

    def strip_response(
        self, response: Response, eos_token_id: int | list[int] | None = None
    ) -> Response:
        """Drop trailing ``<|im_end|>`` / padding text items (LFM2-Audio's
        generation takes no ``eos_token_id`` of its own)."""
        first = response.ids[:, 0]
        n = len(first)
        while n > 0 and int(first[n - 1]) in (IM_END, 0):
            n -= 1
        decoded = response.audio is not None and response.audio["waveform"] is not None
        return response if n == len(first) else self.response(response.ids[:n], decoded)

    # Embeddings of responses -----------------------------------------------------------

    def _context_rows(self, context: EncodedChat) -> Tensor:
        return context.state["embeds"]

    def _last_hidden(self, rows: list[Tensor]) -> Tensor:
        x, mask = widened(*pad_rows(rows))  # products of enough rows (MIN_PRODUCT_ROWS)
        with torch.no_grad():
            return self._lfm(
                inputs_embeds=x, attention_mask=mask, use_cache=False
            ).last_hidden_state

    def token_embeddings(self, response: Response) -> Tensor:
        """Static embeddings of output items (text rows, summed audio frames)."""
        return self._embed_items(response.ids.to(self.device)).float()


def _pretty(token: str) -> str:
    return token.replace("\n", "\\n").strip() or "␣"
