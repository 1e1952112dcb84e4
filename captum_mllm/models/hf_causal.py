"""Adapter for any Hugging Face causal LM with a chat template."""

from __future__ import annotations

import inspect
import re
import sys
from typing import Any, cast

import torch
from torch import Tensor, nn

from captum_mllm.encoding import EncodedChat, MaskedChat
from captum_mllm.errors import (
    EmptyCoalitionError,
    InvalidModelError,
)
from captum_mllm.models.base import ModelAdapter, Response, token_labels
from captum_mllm.models.batching import (
    MIN_PRODUCT_ROWS,
    ints,
    lengths,
    pad_rows,
    target_log_probs,
    to_device,
    widened,
    with_rows,
)
from captum_mllm.models.chat_templates import (
    text_tokenizer,
)
from captum_mllm.models.decoder import same_outputs, without_cudnn_attention
from captum_mllm.models.hf_generation import (
    HFGeneration,
    eos_ids,
    pad_id,
)
from captum_mllm.models.hf_loading import load_pretrained
from captum_mllm.models.packing import PackedRows
from captum_mllm.models.prefix_cache import PrefixCache, cache_kwarg, shares
from captum_mllm.models.template_encoding import ChatTemplateEncoding


class HFCausalLMAdapter(ChatTemplateEncoding, HFGeneration):
    """Wraps a ``transformers`` causal LM (or any module with a HF-style
    ``forward(input_ids, attention_mask) -> .logits``) and its tokenizer.

    Args:
        model (nn.Module or Pipeline): the language model, or a ``transformers``
            text-generation pipeline, whose model and tokenizer are read.
        tokenizer (optional): its Hugging Face tokenizer (a fast one, for
            offsets), or its processor (``AutoProcessor``'s, e.g. Gemma 3's):
            its tokenizer is read, with the processor's chat template where it
            has one. Default: the pipeline's (required for a model)
        chat_template_kwargs (dict, optional): passed to every
            ``tokenizer.apply_chat_template`` call, as transformers takes them
            (e.g. ``{"enable_thinking": False}`` for Qwen3). Default: None

    Examples::

        >>> from captum.attr import ShapleyValueSampling
        >>> from captum_mllm import Chat, ChatInput, HFCausalLMAdapter, MultimodalLLMAttribution
        >>> model = HFCausalLMAdapter.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
        >>> inp = ChatInput(Chat().user("Who wrote Hamlet?"), model)
        >>> attr = MultimodalLLMAttribution(ShapleyValueSampling(model), model)
        >>> res = attr.attribute(inp, n_samples=16, perturbations_per_eval=16)
    """

    reads_answer_lead = True

    def __init__(
        self,
        model: nn.Module | Any,
        tokenizer: Any = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if _is_pipeline(model):  # pipeline("text-generation", ...): what it runs
            tokenizer = tokenizer if tokenizer is not None else model.tokenizer
            model = model.model
        if tokenizer is None:
            raise InvalidModelError(
                f"HFCausalLMAdapter needs {type(model).__name__}'s tokenizer: "
                "HFCausalLMAdapter(model, tokenizer), or HFCausalLMAdapter.from_pretrained(name)"
            )
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise InvalidModelError(  # its forward needs decoder inputs; generation raised
                f"{type(model).__name__} is an encoder-decoder model; HFCausalLMAdapter "
                "explains decoder-only chat models (AutoModelForCausalLM)"
            )
        self.model = model
        self.tokenizer = text_tokenizer(tokenizer)
        self.chat_template_kwargs = chat_template_kwargs  # checked by the setter
        # A wrapper (PEFT's PeftModel, torch.compile's OptimizedModule) hands its
        # keywords on to the model it wraps: that model's forward says which it reads.
        inner: Any = getattr(model, "_orig_mod", model)
        unwrap: Any = getattr(inner, "get_base_model", None)
        forward = getattr(unwrap() if callable(unwrap) else inner, "forward", None)
        params = inspect.signature(forward).parameters if forward else {}
        self._logits_to_keep = "logits_to_keep" in params
        self._cache_kwarg = cache_kwarg(forward)
        self._is_hf = hasattr(model, "config") and hasattr(model, "prepare_inputs_for_generation")
        self._causal: bool | None = None
        self._rope_holders: list[nn.Module] | None = None
        self._head_split: tuple[nn.Module, nn.Module] | None = None
        self._head_probed = False

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        trust_remote_code: bool = False,
        gguf_file: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> HFCausalLMAdapter:
        """Load a model and tokenizer from the Hugging Face hub or a local folder.

        Args:
            name_or_path (str): hub id or local path.
            device (str or torch.device, optional): where to put the model.
                Default: the first GPU when there is one, else the CPU (unless
                ``device_map=`` is given: accelerate places the layers then)
            dtype (torch.dtype or str, optional): e.g. ``torch.bfloat16``.
                Default: the checkpoint's on an accelerator, float32 on the CPU
                (as LFM2-Audio's: a bfloat16 checkpoint run in bfloat16 there is
                slow on most CPUs, and its log-probabilities keep 3 digits)
            trust_remote_code (bool, optional): run code shipped with the
                checkpoint. Default: False
            gguf_file (str, optional): name of a GGUF file inside ``name_or_path``;
                transformers dequantises it (needs the ``gguf`` package). Default: None
            chat_template_kwargs (dict, optional): see the class. Default: None
            **kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (or
                ``AutoModelForImageTextToText``'s, for a vision-language model
                that has no causal-LM class: Qwen2.5-VL, Llava); where the
                files come from (``revision``, ``token``, ``cache_dir``,
                ``local_files_only``, ``force_download``, ``proxies``) to
                ``AutoTokenizer.from_pretrained`` too. ``torch_dtype``, dtype's old
                name, is read as ``dtype``.

        Returns:
            HFCausalLMAdapter: the adapter, in eval mode.

        Examples::

            >>> model = HFCausalLMAdapter.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
            >>> model = HFCausalLMAdapter.from_pretrained(
            ...     "path/to/folder", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        """
        model, tokenizer = load_pretrained(
            name_or_path, device, dtype, trust_remote_code, gguf_file, **kwargs
        )
        return cls(model, tokenizer, chat_template_kwargs)

    @property
    def device(self) -> torch.device:
        device = getattr(self.model, "device", None)
        return device if isinstance(device, torch.device) else next(self.parameters()).device

    @property
    def is_causal(self) -> bool:
        """A transformers model whose outputs at a position do not depend on
        later positions (probed once: a BERT-style ``ForCausalLM`` without
        ``is_decoder`` reads every position); other modules are not assumed
        causal (Captum's toy models are bidirectional)."""
        if self._causal is None:
            self._causal = self._is_hf and self._probe_causal()
        return self._causal

    def _probe_causal(self) -> bool:
        """Whether four tokens' logits are the same alone and followed by four more."""
        ids = torch.arange(1, 9, device=self.device)[None] % (self.vocab_size or 2)
        try:
            with torch.inference_mode(), self.evaluating():  # dropout would fail any model
                whole = self.model(input_ids=ids, use_cache=False).logits[0, :4]
                head = self.model(input_ids=ids[:, :4], use_cache=False).logits[0]
        except (TypeError, ValueError, RuntimeError):  # a forward of its own: as before
            return True
        return same_outputs(head, whole)

    # Captum's BaseLLMAttribution calls the wrapped module's forward and generate.
    @without_cudnn_attention
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @without_cudnn_attention
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's ``generate`` (transformers' arguments), as Captum calls it."""
        return self.model.generate(*args, **kwargs)  # type: ignore[operator]

    # Responses --------------------------------------------------------------------

    def response(self, ids: Tensor) -> Response:
        """Token ids ``(T,)`` as a response, labelled token by token."""
        ids = ids.reshape(-1).long()
        labels = token_labels(self.tokenizer.decode, ids, _pretty)
        return Response(ids=ids, labels=tuple(labels), text=self.tokenizer.decode(ids))

    def strip_response(
        self, response: Response, eos_token_id: int | list[int] | None = None
    ) -> Response:
        """The response without trailing end-of-sequence and padding tokens (the
        model's, and ``eos_token_id``: a generate call's own, which ended it)."""
        stop = eos_ids(self.model, self.tokenizer, eos_token_id) | {pad_id(self.tokenizer)}
        ids = response.ids
        n = len(ids)
        while n > 0 and int(ids[n - 1]) in stop:
            n -= 1
        return response if n == len(ids) else self.response(ids[:n])

    @property
    def vocab_size(self) -> int | None:
        """Rows of the model's input embedding table (else the tokenizer's size)."""
        embeddings = getattr(self.model, "get_input_embeddings", None)
        table = embeddings() if callable(embeddings) else None
        rows = getattr(table, "num_embeddings", None)
        return int(rows) if isinstance(rows, int) else super().vocab_size

    def encodes_as(self, other: ModelAdapter) -> bool:
        """A chat's encoding is its tokenizer's alone: another model read by an
        equal tokenizer (another checkpoint of the family) takes the same input."""
        if not isinstance(other, HFCausalLMAdapter):
            return False
        mine, theirs = self.tokenizer, other.tokenizer
        if self.chat_template_kwargs != other.chat_template_kwargs:  # they change the template
            return False
        return mine is theirs or (
            type(mine) is type(theirs)
            and getattr(mine, "chat_template", None) == getattr(theirs, "chat_template", None)
            and mine.get_vocab() == theirs.get_vocab()
        )

    # Scoring ---------------------------------------------------------------------

    @without_cudnn_attention
    def prefill(self, masked: MaskedChat) -> PrefixCache | None:
        """Forward the untouched prefix once and keep its key/value cache, with
        the full chat's next positions (up to a quarter of the hidden size, the
        last prompt token never): a coalition's row that begins as the full
        chat's does reads those positions from the cache (see
        :attr:`PrefixCache.shared`)."""
        start = masked.prefix_len
        if not self.is_causal or start == 0:
            return None
        self._forget_rope_deltas()
        ids = masked.encoded.input_ids
        if self._continues_cache is None:
            self._continues_cache = self._probe_continuation(ids[: start + 8], start)
        if not self._continues_cache:
            return None
        span = min(len(ids) - 1 - start, self.hidden_size // 4)
        if span < 2 or self._shares_leads is False or not self._is_hf:
            span = 0
        end = start + span
        with torch.inference_mode():
            out = self.model(input_ids=ids[:end].to(self.device)[None], use_cache=True)
        self.n_forward_calls += 1
        cache = getattr(out, self._cache_kwarg, None)
        if not PrefixCache.expandable(cache):
            return None
        prefix = PrefixCache(start, cache, out.logits[0, start - 1], ids[start:end].cpu())
        if span and self._shares_leads is None:
            self._shares_leads = self._probe_sharing(prefix, ids, out.logits[0])
            if not self._shares_leads:
                return self.prefill(masked)
        return prefix

    def _forget_rope_deltas(self) -> None:
        """Clear the position offsets Qwen2-VL-family models keep from their last
        ``generate`` (``rope_deltas``, one row per row generated): a cached
        forward of a chat of text reads them, and after a batched generation
        one of another batch size raised a size error (so the continuation
        probe turned prefix reuse off). Cleared, the model counts positions
        from its cache, as it does before any generation."""
        if self._rope_holders is None:
            self._rope_holders = [m for m in self.model.modules() if hasattr(m, "rope_deltas")]
        for module in self._rope_holders:
            cast(Any, module).rope_deltas = None

    def _probe_continuation(self, ids: Tensor, start: int) -> bool:
        """Whether the model continues a prefix's cache as one forward of the
        whole prompt would: the prompt after ``start`` pushed onto the cache of
        the first ``start`` tokens must give the whole forward's logits. Pure
        state-space models (Mamba) refuse the cache's longer mask, and some
        hybrids (Jamba) restart their recurrent state on a multi-token input:
        their coalitions are scored without prefix reuse. Probed once per
        adapter."""
        ids = ids.to(self.device)[None]
        try:
            with torch.inference_mode(), self.evaluating():
                whole = self.model(input_ids=ids, use_cache=False).logits[0, start:]
                out = self.model(input_ids=ids[:, :start], use_cache=True)
                cache = getattr(out, self._cache_kwarg, None)
                if not PrefixCache.expandable(cache):
                    return False
                rest = self.model(
                    input_ids=ids[:, start:],
                    attention_mask=torch.ones_like(ids),
                    use_cache=True,
                    **{self._cache_kwarg: PrefixCache(start, cache, out.logits[0, -1]).expand(1)},
                ).logits[0]
        except (TypeError, ValueError, RuntimeError):
            return False
        return same_outputs(rest, whole)

    def _probe_sharing(self, prefix: PrefixCache, ids: Tensor, logits: Tensor) -> bool:
        """Whether this model reads shared positions as :meth:`_score_rows`
        asks (explicit position ids, a mask with holes in the cache): the rest
        of the prompt pushed after half the shared positions must give the
        logits of the full chat's forward. Probed once per adapter."""
        start, span = prefix.length, len(prefix.shared)
        lead = span // 2
        row = ids[start + lead :].to(self.device)[None]
        seen, positions = prefix.reading([lead], row.shape[1], self.device)
        try:
            with torch.inference_mode():
                out = self.model(
                    input_ids=row,
                    attention_mask=torch.cat([seen, torch.ones_like(row)], 1),
                    position_ids=positions,
                    use_cache=True,
                    **{self._cache_kwarg: prefix.expand(1)},
                )
        except (TypeError, ValueError, RuntimeError):
            return False
        return same_outputs(out.logits[0, : span - lead], logits[start + lead :])

    def _split_head(self) -> tuple[nn.Module, nn.Module] | None:
        """The model as (decoder, output embeddings) when the two give exactly the
        model's own logits (probed once on three tokens; a model that rescales
        or caps its logits fails the probe), else None. Scoring then applies the
        head to the target positions of each row alone: padding and the
        positions of other rows get no logits."""
        if not self._head_probed:
            self._head_probed = True
            decoder = getattr(self.model, "get_decoder", None)
            head = getattr(self.model, "get_output_embeddings", None)
            if self._is_hf and callable(decoder) and callable(head):
                probe = torch.tensor([[1, 2, 3]], device=self.device)
                try:
                    parts = (decoder(), head())
                    with torch.inference_mode():
                        whole = self.model(input_ids=probe, use_cache=False).logits
                        split = parts[1](parts[0](input_ids=probe, use_cache=False)[0])
                    if torch.equal(whole, split):
                        self._head_split = parts
                except (TypeError, ValueError, RuntimeError, AttributeError):
                    pass  # not a plain decoder + head: the model's own logits it is
        return self._head_split

    def _packing_probe(self) -> tuple[Tensor, Tensor] | None:
        """Needs a causal model whose head splits off (:meth:`_split_head`)."""
        split = self._split_head()
        if not self.is_causal or split is None:
            return None
        vocab = self.vocab_size or 2
        rows = [torch.arange(1, n + 1) % vocab for n in (3, 9, 20)]
        fed = torch.arange(2, 4) % vocab
        out = self.model(
            input_ids=torch.arange(5, 9, device=self.device)[None] % vocab, use_cache=True
        )
        cache = getattr(out, self._cache_kwarg, None)
        prefixes: list[PrefixCache | None] = [None]
        if PrefixCache.expandable(cache):
            prefixes.append(PrefixCache(4, cache, out.logits[0, -1]))
        packed = [
            self._head(split[1], self._packed_states(split[0], rows, fed, p, None, 3), len(rows))
            for p in prefixes
        ]
        padded = [self._padded_logits(rows, fed, p, None, 3, split) for p in prefixes]
        return torch.cat(packed), torch.cat(padded)

    def _coalition_rows(self, masked: MaskedChat, prefix: Any) -> list[Tensor]:
        # Built on the CPU; each batch moves to the model once (pad_rows).
        start = prefix.length if prefix is not None else 0
        return masked.rows(start)

    def _fed(self, response: Response) -> Tensor:
        return to_device(response.ids, self.device)

    def _score_rows(
        self,
        rows: list[Tensor],
        response: Response,
        first: int,
        last: int,
        prefix: Any,
        feed_all: bool = False,
    ) -> Tensor:
        """One forward, packed (:meth:`packs`) or right-padded; rows already
        hold the first ``first`` target tokens."""
        if prefix is not None:
            self._forget_rope_deltas()
        device = self.device
        host = response.ids[first:last]
        target = to_device(host, device)
        n_target = int(target.shape[0])
        batch = len(rows)
        leads = prefix.leads(rows) if shares(prefix) else None
        if leads is not None:  # positions the cache holds are not pushed again
            rows = [r[n:] for r, n in zip(rows, leads, strict=True)]
        sizes = lengths(rows)
        if prefix is None and 0 in sizes:
            raise EmptyCoalitionError(
                "a coalition removed every input token; keep some template text fixed"
            )
        # The last target token predicts nothing we need: feed T - 1 of them, unless
        # the model is bidirectional and Captum's forward feeds them all.
        fed = host if feed_all else host[:-1]
        split = self._split_head()
        if split is not None and self.packs():
            with torch.inference_mode():
                states = self._packed_states(split[0], rows, fed, prefix, leads, n_target)
                picked = self._head(split[1], states, batch)
        else:
            picked = self._padded_logits(rows, fed, prefix, leads, n_target, split)
        self.n_forward_calls += 1
        if prefix is not None and 0 in sizes:
            empty = to_device(ints(sizes) == 0, picked.device)
            picked[empty, 0] = prefix.last.to(picked.dtype)
        return target_log_probs(picked, target)

    def _padded_logits(
        self,
        rows: list[Tensor],
        fed: Tensor,
        prefix: Any,
        leads: list[int] | None,
        n_target: int,
        split: tuple[nn.Module, nn.Module] | None,
    ) -> Tensor:
        """Logits ``(B, T, V)`` that predict the ``T = n_target`` target tokens,
        of one right-padded forward of the rows (each followed by ``fed``)."""
        device, batch = self.device, len(rows)
        sizes = lengths(rows)
        # Positions in each row that predict target token j of row b: lens[b] - 1 + j.
        index = to_device(ints(sizes)[:, None] - 1 + torch.arange(n_target)[None], device)
        ids, mask = pad_rows(rows, pad_id(self.tokenizer), device=device, suffix=fed)
        if self.is_causal:  # products of enough rows (MIN_PRODUCT_ROWS)
            ids, mask = widened(ids, mask, pad_id(self.tokenizer))
        width = ids.shape[1]
        kwargs: dict[str, Any] = {}
        if self._is_hf:
            kwargs["use_cache"] = prefix is not None
        if prefix is not None:
            kwargs[self._cache_kwarg] = prefix.expand(batch)
            if leads is None:
                seen = mask.new_ones(batch, prefix.length)
            else:  # each row sees the shared positions it begins with
                seen, kwargs["position_ids"] = prefix.reading(leads, width, device)
            mask = torch.cat([seen, mask], dim=1)
        with torch.inference_mode():
            if split is not None:
                hidden = split[0](input_ids=ids, attention_mask=mask, **kwargs)[0]
                at = index.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1])
                return self._head(split[1], hidden.gather(1, at).flatten(0, 1), batch)
            # logits kept for at least MIN_PRODUCT_ROWS positions a row (the head's product)
            lowest = max(0, min(max(min(sizes), 1) - 1, width - MIN_PRODUCT_ROWS))
            if self._logits_to_keep:
                kwargs["logits_to_keep"] = torch.arange(lowest, width, device=device)
                index = index - lowest
            logits = self.model(input_ids=ids, attention_mask=mask, **kwargs).logits
            if logits.dim() == 4:  # (B, 1, S, V) from some models
                logits = logits[:, 0]
            at = index.clamp(min=0)[..., None].expand(-1, -1, logits.shape[-1])
            return logits.gather(1, at)

    def _packed_states(
        self,
        decoder: nn.Module,
        rows: list[Tensor],
        fed: Tensor,
        prefix: Any,
        leads: list[int] | None,
        n_target: int,
    ) -> Tensor:
        """Last hidden states ``(B * T, d)`` that predict the ``T = n_target``
        target tokens, of the rows (each followed by ``fed``) packed into one
        forward (:mod:`~captum_mllm.models.packing`)."""
        cached = 0 if prefix is None else prefix.length + len(prefix.shared)
        start = 0 if prefix is None else prefix.length
        first = [start + n for n in (leads or [0] * len(rows))]
        pad = pad_id(self.tokenizer)
        layout, ids = PackedRows.of(rows, cached, first, first, pad, self.device, suffix=fed)
        hidden = self._packed_forward(decoder, layout, prefix, input_ids=ids)[0]
        at = layout.predicting(lengths(rows), n_target)
        return hidden[0].index_select(0, to_device(at.flatten(), hidden.device))

    @staticmethod
    def _head(head: nn.Module, states: Tensor, batch: int) -> Tensor:
        """Logits ``(B, T, V)`` of ``(B * T, d)`` states (a product of enough rows)."""
        return head(with_rows(states))[: len(states)].reshape(batch, len(states) // batch, -1)

    # Response embeddings (for EmbeddingSimilarity) ---------------------------------

    def token_embeddings(self, response: Response) -> Tensor:
        """``(n, d)`` rows of the model's input embedding table."""
        with torch.no_grad():
            table = self.model.get_input_embeddings()  # type: ignore[operator]
            return table(response.ids.to(self.device)).float()

    def input_embeddings(self, encoded: EncodedChat) -> Tensor:
        """``(L, D)`` rows of the input embedding table for the chat's tokens."""
        with torch.no_grad():
            table = self.model.get_input_embeddings()  # type: ignore[operator]
            return table(encoded.input_ids.to(self.device)).detach()

    def attention_inputs(
        self, encoded: EncodedChat, response: Response
    ) -> tuple[nn.Module, dict[str, Tensor]]:
        ids = torch.cat([encoded.input_ids, response.ids[:-1].cpu()]).to(self.device)
        return self.model, {"input_ids": ids[None]}

    @without_cudnn_attention
    def next_token_log_probs(self, embeds: Tensor, response: Response, token: int) -> Tensor:
        """``(B,)``: one forward from ``inputs_embeds``, differentiable in ``embeds``."""
        with torch.no_grad():
            table = self.model.get_input_embeddings()  # type: ignore[operator]
            fed = table(response.ids[:token].to(self.device))
        x = torch.cat([embeds, fed[None].expand(len(embeds), -1, -1).to(embeds.dtype)], 1)
        logits = self.model(inputs_embeds=x).logits[:, -1].float()
        self.n_forward_calls += 1
        return logits.log_softmax(-1)[:, int(response.ids[token])]

    def response_log_prob(self, embeds: Tensor, response: Response) -> Tensor:
        """``(B,)``: every response token scored in one forward from ``inputs_embeds``."""
        ids = response.ids.to(self.device)
        with torch.no_grad():
            fed = self.model.get_input_embeddings()(ids[:-1])  # type: ignore[operator]
        x = torch.cat([embeds, fed[None].expand(len(embeds), -1, -1).to(embeds.dtype)], 1)
        start = embeds.shape[1] - 1  # the last prompt position predicts the first token
        logits = self.model(inputs_embeds=x).logits[:, start:].float()
        self.n_forward_calls += 1
        return logits.log_softmax(-1).gather(2, ids.expand(len(x), -1)[..., None]).sum((1, 2))

    def _context_rows(self, context: EncodedChat) -> Tensor:
        return context.input_ids.to(self.device)

    def _last_hidden(self, rows: list[Tensor]) -> Tensor:
        ids, mask = pad_rows(rows, pad_id(self.tokenizer))
        if self.is_causal:  # products of enough rows (MIN_PRODUCT_ROWS)
            ids, mask = widened(ids, mask, pad_id(self.tokenizer))
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return out.hidden_states[-1]


def _is_pipeline(obj: Any) -> bool:
    """Whether ``obj`` is a ``transformers`` pipeline (imported only if loaded)."""
    pipelines = sys.modules.get("transformers.pipelines.base")
    return pipelines is not None and isinstance(obj, pipelines.Pipeline)


def _pretty(token: str) -> str:
    return re.sub(r"\n", "\\\\n", token).strip() or token
