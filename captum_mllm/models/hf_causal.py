"""Adapter for any Hugging Face causal LM with a chat template."""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from captum_mllm.chat import Chat, as_chat
from captum_mllm.encoding import TEXT, EncodedChat, MaskedChat
from captum_mllm.errors import (
    ChatTemplateError,
    EmptyCoalitionError,
    InvalidContentError,
    InvalidModelError,
)
from captum_mllm.models.base import ModelAdapter
from captum_mllm.models.batching import by_length, default_call_cost, pad_rows

DEFAULT_GEN_ARGS: dict[str, Any] = {"max_new_tokens": 25, "do_sample": False}


@dataclass
class PrefixCache:
    """Key/value cache of the positions no feature touches, computed once."""

    length: int
    cache: Any
    last_logits: Tensor  # (V,) logits after the prefix

    def expand(self, batch_size: int) -> Any:
        # The model appends to the cache it is given: hand it a fresh copy.
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(batch_size)
        return cache


class HFCausalLMAdapter(ModelAdapter):
    """Wraps a ``transformers`` causal LM (or any module with a HF-style
    ``forward(input_ids, attention_mask) -> .logits``) and its tokenizer.

    Args:
        model (nn.Module): the language model.
        tokenizer: its Hugging Face tokenizer (a fast one, for offsets).

    Examples::

        >>> from captum.attr import ShapleyValueSampling
        >>> from captum_mllm import Chat, ChatInput, HFCausalLMAdapter, MultimodalLLMAttribution
        >>> model = HFCausalLMAdapter.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
        >>> inp = ChatInput(Chat().user("Who wrote Hamlet?"), model)
        >>> attr = MultimodalLLMAttribution(ShapleyValueSampling(model), model)
        >>> res = attr.attribute(inp, n_samples=16, perturbations_per_eval=16)
    """

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        forward = getattr(model, "forward", None)
        params = inspect.signature(forward).parameters if forward else {}
        self._logits_to_keep = "logits_to_keep" in params
        # transformers >= 5.2x calls the key/value cache ``cache``; older ones ``past_key_values``.
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._is_hf = hasattr(model, "config") and hasattr(model, "prepare_inputs_for_generation")
        # Per-forward overhead in tokens, for grouping rows by length (see score);
        # None: 80 on CPU (a forward reads every weight once: ~80 tokens of compute
        # for a 10M model on 2 cores, measured); one batch on accelerators.
        self.call_cost: int | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        trust_remote_code: bool = False,
        gguf_file: str | None = None,
        **kwargs: Any,
    ) -> HFCausalLMAdapter:
        """Load a model and tokenizer from the Hugging Face hub or a local folder.

        Args:
            name_or_path (str): hub id or local path.
            device (str or torch.device, optional): where to put the model.
            dtype (torch.dtype or str, optional): e.g. ``torch.bfloat16``; default
                the checkpoint's.
            trust_remote_code (bool, optional): run code shipped with the
                checkpoint. Default: False
            gguf_file (str, optional): name of a GGUF file inside ``name_or_path``;
                transformers dequantises it (needs the ``gguf`` package). Default: None
            **kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.

        Returns:
            HFCausalLMAdapter: the adapter, in eval mode.

        Examples::

            >>> model = HFCausalLMAdapter.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
            >>> model = HFCausalLMAdapter.from_pretrained(
            ...     "path/to/folder", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if gguf_file is not None:
            common["gguf_file"] = gguf_file
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **common)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype or "auto", **common, **kwargs
        )
        if device is not None:
            model.to(device)  # type: ignore[arg-type]
        return cls(model.eval(), tokenizer)

    @property
    def device(self) -> torch.device:
        device = getattr(self.model, "device", None)
        return device if isinstance(device, torch.device) else next(self.parameters()).device

    # Captum's BaseLLMAttribution calls the wrapped module's forward and generate.
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)  # type: ignore[operator]

    # Encoding --------------------------------------------------------------------

    def encode(self, chat: Chat | Sequence[Any]) -> EncodedChat:
        """Render the chat with the tokenizer's chat template (generation prompt
        appended) and record, for each token, its turn, part and character span.

        Args:
            chat (Chat or list of dict): the chat.

        Returns:
            EncodedChat: the position table.
        """
        chat = as_chat(chat)
        if chat.has_audio:
            raise InvalidContentError(
                "HFCausalLMAdapter reads text only; use LFM2AudioAdapter for chats with audio"
            )
        if not getattr(self.tokenizer, "is_fast", False):
            raise InvalidModelError(
                "HFCausalLMAdapter needs a fast tokenizer (for character offsets); load it "
                "with AutoTokenizer.from_pretrained(..., use_fast=True)"
            )
        # Parts of a turn are joined by newlines into the message content.
        contents = ["\n".join(p.text for p in t.parts) for t in chat]  # type: ignore[union-attr]
        messages = [{"role": t.role, "content": c} for t, c in zip(chat, contents, strict=True)]
        rendered = self._render(messages, generation_prompt=True)
        located = _locate_contents(self._render, messages, rendered)
        turn_spans = self._turn_spans(messages, rendered, located)

        spans: list[tuple[int, int, int, int]] = []  # (turn, part, start, end) in `rendered`
        part_texts: dict[tuple[int, int], str] = {}
        for ti, turn in enumerate(chat):
            c_start, c_end, trimmed = located[ti]
            offset = c_start - trimmed  # where the untrimmed content would start
            cursor = 0
            for pi, part in enumerate(turn.parts):
                text = part.text  # type: ignore[union-attr]
                p_start, p_end = offset + cursor, offset + cursor + len(text)
                cursor += len(text) + 1  # the joining newline
                # A template that trims the content cuts the outer parts' edges.
                p_start, p_end = max(p_start, c_start), min(p_end, c_end)
                part_texts[(ti, pi)] = rendered[p_start:p_end] if p_end > p_start else ""
                if p_end > p_start:
                    spans.append((ti, pi, p_start, p_end))

        enc = self.tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = list(enc["offset_mapping"])
        special_ids = set(self.tokenizer.all_special_ids)
        n = len(ids)
        turn_col = torch.full((n,), -1, dtype=torch.long)
        part_col = torch.full((n,), -1, dtype=torch.long)
        cstart = torch.full((n,), -1, dtype=torch.long)
        cend = torch.full((n,), -1, dtype=torch.long)
        for i, (s, e) in enumerate(offsets):
            # A token belongs to the turn whose own span (header, content, end
            # tokens) holds its first character; inserted template text to none.
            turn_col[i] = next((k for k, (a, b) in enumerate(turn_spans) if a <= s < b), -1)
            if ids[i] in special_ids:
                continue
            for ti, pi, ps, pe in spans:
                if s < pe and e > ps:  # token overlaps the part
                    turn_col[i], part_col[i] = ti, pi
                    cstart[i], cend[i] = max(s, ps) - ps, min(e, pe) - ps
                    break
        return EncodedChat(
            input_ids=torch.tensor(ids, dtype=torch.long),
            modality=[TEXT] * n,
            turn=turn_col,
            part=part_col,
            char_start=cstart,
            char_end=cend,
            special=torch.tensor([i in special_ids for i in ids]),
            tokens=[rendered[s:e] for s, e in offsets],
            roles=[t.role for t in chat],
            part_texts=part_texts,
        )

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _turn_spans(
        self,
        messages: list[dict[str, Any]],
        rendered: str,
        located: list[tuple[int, int, int]],
    ) -> list[tuple[int, int]]:
        """Character span of each turn's own text: its header, content and end tokens.

        Turn k ends where the rendering of the first k + 1 messages ends. Turn 0
        starts where its own block starts when it follows another turn, so text
        the template inserts before it (a default system prompt, a BOS token)
        belongs to no turn. A template that does not render prefixes as
        prefixes gets content-only turns.
        """
        ends = []
        for k in range(len(messages)):
            head = self._render(messages[: k + 1])
            if not rendered.startswith(head) or len(head) < located[k][1]:
                return [(a, b) for a, b, _ in located]
            ends.append(len(head))
        first = located[0][0]
        dummy = {"role": "user" if messages[0]["role"] == "system" else "system", "content": "x"}
        try:
            lead = self._render([dummy])
            block = self._render([dummy, messages[0]])[len(lead) :]
        except Exception:  # a template that refuses this order: content-only start
            block = ""
        if block and rendered[: ends[0]].endswith(block):
            first = ends[0] - len(block)
        return [(first if k == 0 else ends[k - 1], ends[k]) for k in range(len(messages))]

    def decode_tokens(self, ids: Tensor) -> list[str]:
        return [_pretty(self.tokenizer.decode([int(i)])) for i in ids]

    # Scoring ---------------------------------------------------------------------

    def prefill(self, masked: MaskedChat) -> PrefixCache | None:
        """Forward the untouched prefix once and keep its key/value cache."""
        if not self._is_hf or masked.prefix_len == 0:
            return None
        ids = masked.encoded.input_ids[: masked.prefix_len].to(self.device)[None]
        with torch.no_grad():
            out = self.model(input_ids=ids, use_cache=True)
        self.n_forward_calls += 1
        cache = getattr(out, self._cache_kwarg, None)
        if not hasattr(cache, "batch_repeat_interleave"):
            return None
        return PrefixCache(masked.prefix_len, cache, out.logits[0, -1])

    def score_masked(
        self,
        masked: MaskedChat,
        target: Tensor,
        prefix: PrefixCache | None = None,
        per_step: bool = False,
    ) -> Tensor:
        start = prefix.length if prefix is not None else 0
        return self.score(masked.rows(start), target, prefix, per_step)

    def score(
        self,
        rows: list[Tensor],
        target: Tensor,
        prefix: PrefixCache | None = None,
        per_step: bool = False,
    ) -> Tensor:
        """Teacher-forced log-probabilities of ``target`` after each row.

        Rows are right-padded: under a causal mask padding after a sequence
        cannot change it, so neither position ids nor the model's mask handling
        matter for correctness.

        Args:
            rows (list of Tensor): B prompts (after the prefix, if any).
            target (Tensor): ``(T,)`` target ids.
            prefix (PrefixCache, optional): shared prefix state.
            per_step (bool, optional): one forward per target token, as Captum's
                ``forward_in_tokens=True``; gives the same values.

        Returns:
            Tensor: ``(B, T)`` float32 log-probabilities.
        """
        if per_step:
            steps = [
                self._forward_logprobs(
                    [torch.cat([r, target[:t].to(r.device)]) for r in rows],
                    target[t : t + 1],
                    prefix,
                )
                for t in range(len(target))
            ]
            return torch.cat(steps, dim=1)
        # (B, L_b) rows -> (B, T); rows of similar length share a forward.
        call_cost = self.call_cost or default_call_cost(self.device)
        return by_length(
            rows, len(target), call_cost, lambda part: self._forward_logprobs(part, target, prefix)
        )

    def _forward_logprobs(
        self,
        rows: list[Tensor],
        target: Tensor,
        prefix: PrefixCache | None,
    ) -> Tensor:
        device = self.device
        target = target.to(device)
        n_target = int(target.shape[0])
        batch = len(rows)
        lens = torch.tensor([len(r) for r in rows], device=device)
        if prefix is None and bool((lens == 0).any()):
            raise EmptyCoalitionError(
                "a coalition removed every input token; keep some template text fixed"
            )
        # The last target token predicts nothing we need: feed T - 1 of them.
        fed = target[: n_target - 1]
        ids, mask = pad_rows(
            [torch.cat([r.to(device), fed]) for r in rows], _pad_id(self.tokenizer)
        )
        width = ids.shape[1]

        kwargs: dict[str, Any] = {}
        if self._is_hf:
            kwargs["use_cache"] = prefix is not None
        if prefix is not None:
            kwargs[self._cache_kwarg] = prefix.expand(batch)
            mask = torch.cat([mask.new_ones(batch, prefix.length), mask], dim=1)
        # Logit positions that predict target token j of row b: lens[b] - 1 + j.
        first = int(lens.min().clamp(min=1)) - 1
        offset = 0
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = torch.arange(first, width, device=device)
            offset = first
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=mask, **kwargs).logits
        self.n_forward_calls += 1
        if logits.dim() == 4:  # (B, 1, S, V) from some models
            logits = logits[:, 0]
        index = (lens - 1)[:, None] + torch.arange(n_target, device=device)[None] - offset
        picked = logits.gather(1, index.clamp(min=0)[..., None].expand(-1, -1, logits.shape[-1]))
        if prefix is not None and bool((lens == 0).any()):
            picked[lens == 0, 0] = prefix.last_logits.to(picked.dtype)
        logp = picked.float().log_softmax(-1)
        return logp.gather(2, target[None, :, None].expand(batch, -1, 1)).squeeze(-1)

    @property
    def vocab_size(self) -> int | None:
        """Rows of the model's input embedding table (else the tokenizer's size)."""
        embeddings = getattr(self.model, "get_input_embeddings", None)
        table = embeddings() if callable(embeddings) else None
        rows = getattr(table, "num_embeddings", None)
        return int(rows) if isinstance(rows, int) else super().vocab_size

    # Response embeddings (for EmbeddingSimilarity) ---------------------------------

    def strip_response(self, ids: Tensor) -> Tensor:
        """The response without trailing end-of-sequence and padding tokens."""
        stop = _eos_ids(self.model, self.tokenizer) | {_pad_id(self.tokenizer)}
        n = len(ids)
        while n > 0 and int(ids[n - 1]) in stop:
            n -= 1
        return ids[:n]

    def token_embeddings(self, ids: Tensor) -> Tensor:
        """``(n,) -> (n, d)`` rows of the model's input embedding table."""
        with torch.no_grad():
            return self.model.get_input_embeddings()(ids.to(self.device)).float()  # type: ignore[operator]

    def decode_response(self, ids: Tensor) -> str:
        """A response as text."""
        return self.tokenizer.decode(ids)

    def response_states(
        self, responses: list[Tensor], context: EncodedChat | None = None
    ) -> list[Tensor]:
        """Last hidden states over each response, ``(n_i, d)``, read alone or
        after ``context`` (the full chat), in one right-padded forward."""
        lead = context.input_ids.to(self.device) if context is not None else None
        rows = [
            r.to(self.device) if lead is None else torch.cat([lead, r.to(self.device)])
            for r in responses
        ]
        ids, mask = pad_rows(rows, _pad_id(self.tokenizer))
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        self.n_forward_calls += 1
        start = 0 if lead is None else len(lead)
        last = out.hidden_states[-1].float()
        return [last[b, start : start + len(r)] for b, r in enumerate(responses)]

    # Generation ------------------------------------------------------------------

    def generate_masked(self, masked: MaskedChat, **gen_args: Any) -> list[Tensor]:
        return self.generate_rows(masked.rows(), **gen_args)

    def generate_rows(self, rows: list[Tensor], **gen_args: Any) -> list[Tensor]:
        """Continue each row with ``model.generate``, left-padded in one batch.

        Args:
            rows (list of Tensor): B prompts.
            **gen_args: ``generate`` arguments; default greedy, 25 new tokens.

        Returns:
            list of Tensor: the new tokens of each row, up to and including EOS.
        """
        pad = _pad_id(self.tokenizer)
        ids, mask = pad_rows(rows, pad, left=True, device=self.device)
        width = ids.shape[1]
        args = {**DEFAULT_GEN_ARGS, **gen_args}
        for key in ("audio_temperature", "audio_top_k"):  # a text model has no audio to sample
            args.pop(key, None)
        if args.get("do_sample") and args.get("temperature") is None and args.get("top_k") is None:
            args["do_sample"] = False  # only audio sampling was asked for
        if self._is_hf:
            args.setdefault("pad_token_id", pad)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, **args)  # type: ignore[operator]
        self.n_forward_calls += 1
        new = out[:, width:]
        eos = _eos_ids(self.model, self.tokenizer)
        result = []
        for row in new:
            stop = next((i + 1 for i, t in enumerate(row.tolist()) if t in eos), len(row))
            result.append(row[:stop])
        return result


_SENTINEL = "\ue000{}\ue001"  # private-use characters: never in a template


def _locate_contents(
    render: Callable[[list[dict[str, Any]], bool], str],
    messages: list[dict[str, Any]],
    rendered: str,
) -> list[tuple[int, int, int]]:
    """Where each message's content lies in the rendering of the chat.

    The chat is rendered once more with each content replaced by a sentinel;
    the template text between sentinels is then matched piece by piece against
    the real rendering, so a content is only ever found in its own turn, never
    in template text (a default system prompt, a role header).

    Returns:
        list of (start, end, trimmed): character span of each content, and how
        many leading characters the template trimmed from it.
    """
    skeleton = render([{**m, "content": _SENTINEL.format(k)} for k, m in enumerate(messages)], True)
    pieces = re.split("\ue000\\d+\ue001", skeleton)
    if len(pieces) != len(messages) + 1:
        raise ChatTemplateError(
            "the chat template repeats or drops message contents; it cannot be explained "
            "by position (render it yourself and use Captum's TextTemplateInput)"
        )
    out: list[tuple[int, int, int]] = []
    cursor = 0
    for k, message in enumerate(messages):
        if not rendered.startswith(pieces[k], cursor):
            raise ChatTemplateError(f"the chat template renders turn {k} differently per content")
        cursor += len(pieces[k])
        content = message["content"]
        lead = len(content) - len(content.lstrip())
        # As given, or trimmed by the template (e.g. Jinja's ``| trim``).
        for text, trimmed in (
            (content, 0),
            (content.strip(), lead),
            (content.lstrip(), lead),
            (content.rstrip(), 0),
        ):
            after = cursor + len(text)
            if rendered.startswith(text, cursor) and rendered.startswith(pieces[k + 1], after):
                out.append((cursor, after, trimmed))
                cursor = after
                break
        else:
            raise ChatTemplateError(
                f"the chat template changed the text of turn {k}; cannot locate {content[:40]!r}"
            )
    return out


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    config = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    return ids


def _pretty(token: str) -> str:
    return re.sub(r"\n", "\\\\n", token).strip() or token
