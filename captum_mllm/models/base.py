"""The contract every model adapter follows, and the response type adapters own.

An adapter is an ``nn.Module`` (so Captum's methods and ``BaseLLMAttribution``
accept it) with ``.device`` and ``.tokenizer``. Inputs, targets and attribution
call only the methods listed on :class:`ModelAdapter`; they are abstract, so a
subclass that lacks one cannot be instantiated. ``check_adapter`` in
:mod:`captum_mllm.testing` checks that an adapter also behaves as the contract says.

Model knowledge (chat layout, how a response is laid out, frame lengths) stays
in the adapter: everyone else sees a :class:`Response`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from captum_mllm.encoding import EncodedChat, MaskedChat
from captum_mllm.errors import InvalidContentError, InvalidModelError, TargetError


def in_eval_mode[Method: Callable[..., Any]](method: Method) -> Method:
    """Run an attribution method's ``attribute`` with ``self.adapter`` in eval
    mode (:meth:`ModelAdapter.evaluating`)."""

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.adapter.evaluating():
            return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


class _ThreadCalls(threading.local):
    """Each thread's model calls, by adapter (:meth:`ModelAdapter.thread_forward_calls`)."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}


_THREAD_CALLS = _ThreadCalls()

#: Held while an adapter's eval-mode holders are counted (:meth:`ModelAdapter.evaluating`).
_EVALUATING = threading.Lock()

#: Names Hugging Face models give a learned absolute position table.
_POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")


@dataclass(frozen=True, eq=False)
class Response:
    """What a model said (or is asked to have said), in the adapter's own layout.

    Attributes:
        ids (Tensor): the adapter's encoding of the response; only the adapter
            that made it reads it (text models: ``(T,)`` token ids).
        labels (tuple of str): one readable label per output token (an 80 ms
            audio frame counts as one token); ``len(response)`` is their number.
        text (str): the response as text (audio frames noted, not transcribed).
        audio (dict, optional): the spoken part: ``{"codes": (8, F) tensor,
            "waveform": tensor or None, "sample_rate": int}`` (None for the
            answers of ``generate_masked``, which nothing listens to: the
            explained answer is decoded).
    """

    ids: Tensor
    labels: tuple[str, ...]
    text: str
    audio: dict[str, Any] | None = field(default=None)

    def __len__(self) -> int:
        return len(self.labels)


#: Captum's mark on a token holding part of a character the token before began.
OVERLAP = " [OVERLAP]"


def token_labels(
    decode: Callable[[Tensor], str], ids: Tensor, pretty: Callable[[str], str]
) -> list[str]:
    """One label per token: ``pretty`` of the text it holds.

    A token that holds part of a character (byte-level vocabularies split
    ``東`` or ``🗼`` over several tokens, each decoding alone to ``�``) is
    labelled with the whole character, and every token after the first that
    holds part of it is marked ``[OVERLAP]``, as Captum's pretty tokens are.

    Args:
        decode (Callable): the tokenizer's ``decode`` (given slices of ``ids``,
            as Captum gives it).
        ids (Tensor): the tokens, ``(T,)``.
        pretty (Callable): a decoded text as a label.

    Returns:
        list of str: the labels.
    """
    alone = [decode(ids[k : k + 1]) for k in range(len(ids))]
    labels: list[str] = []
    k = 0
    while k < len(ids):
        if "\ufffd" not in alone[k]:
            labels.append(pretty(alone[k]))
            k += 1
            continue
        end = k  # a run of tokens holding parts of characters, read together
        while end < len(ids) and "\ufffd" in alone[end]:
            end += 1
        whole = decode(ids[k:end])
        done, pending = 0, False  # characters complete before a token; one left unfinished
        # decoding restarts after a token ending in a whole character (the bytes
        # after it decode alone): linear in the run, not quadratic; from the run's
        # start again where a tokenizer decodes a piece otherwise (a space dropped)
        start, offset, separable = k, 0, True
        for j in range(k + 1, end + 1):
            prefix = decode(ids[start:j])
            if start > k and not whole.startswith(prefix.rstrip("\ufffd"), offset):
                start, offset, separable = k, 0, False
                prefix = decode(ids[k:j])
            size = offset + len(prefix)
            n = size
            while n > done and prefix[n - offset - 1] == "\ufffd" and whole[n - 1 : n] != "\ufffd":
                n -= 1  # an unfinished character, where the run finishes it
            touched, overlap = whole[done : n + (n < size)], pending
            if not touched and done:  # shows nothing new: it goes on with the character before
                touched, overlap = whole[done - 1 : done], True
            labels.append(pretty(touched) + (OVERLAP if overlap else ""))
            done, pending = n, n < size
            if separable and not pending and prefix[-1:] not in ("", "\ufffd"):
                start, offset = j, n
        k = end
    return labels


class ModelAdapter(nn.Module, ABC):
    """Base class of model adapters: every method others call is listed here.

    It counts its model forwards (and generation calls) in ``n_forward_calls``.
    """

    #: Explanations running in eval mode (:meth:`evaluating`), and the modules
    #: the first of them found training.
    _evaluators: int = 0
    _was_training: list[nn.Module] = []  # replaced, never appended to

    tokenizer: Any

    def __init__(self) -> None:
        super().__init__()
        self._forward_calls = 0

    @property
    def n_forward_calls(self) -> int:
        """Model forwards and generation calls so far, in every thread."""
        return self._forward_calls

    @n_forward_calls.setter
    def n_forward_calls(self, value: int) -> None:  # counted under PROCESS_WIDE
        counts = _THREAD_CALLS.counts
        counts[id(self)] = counts.get(id(self), 0) + value - self._forward_calls
        self._forward_calls = value

    def thread_forward_calls(self) -> int:
        """Model forwards and generation calls so far in the calling thread: what
        an explanation counts, while other threads explain with this model too."""
        return _THREAD_CALLS.counts.get(id(self), 0)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encodes_as(self, other: ModelAdapter) -> bool:
        """Whether a chat this adapter encoded (a :class:`~captum_mllm.ChatInput`
        built with it) means the same to ``other``. By default only for this
        adapter itself; adapters whose encoding depends on less say so."""
        return self is other

    def held_modules(self) -> list[nn.Module]:
        """The modules whose mode the adapter's outputs depend on: itself (and
        so every submodule), plus any it uses without holding as one."""
        return [self]

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Within: every module of :meth:`held_modules` in eval mode, and after,
        each back in the mode it was in. A model left in training mode (built
        from a config, or in the middle of fine-tuning) would drop activations
        at random, dither its audio, or use and update batch statistics on
        every forward: then no value is a function of its coalition.

        Explanations in several threads share it: the first to enter sets eval
        mode and the last to leave puts the modes back (the first to leave put
        training back while another thread's explanation was still running)."""
        with _EVALUATING:
            if not self._evaluators:
                roots = self.held_modules()
                self._was_training = [m for root in roots for m in root.modules() if m.training]
                for root in roots:
                    root.eval()
            self._evaluators += 1
        try:
            yield
        finally:
            with _EVALUATING:
                self._evaluators -= 1
                if not self._evaluators:
                    for module in self._was_training:  # the flag alone: train() recurses
                        module.training = True
                    self._was_training = []

    @property
    def is_causal(self) -> bool:
        """Whether a position never sees later ones (then padding after a row, a
        shared prefix cache and scoring a whole response in one forward are exact)."""
        return True

    # Encoding ------------------------------------------------------------------------

    @abstractmethod
    def encode(self, chat: Any) -> EncodedChat:
        """Encode a chat (a :class:`Chat` or a message list) with generation prompt."""

    #: Whether :meth:`encode_prompt` may put template text before a given answer
    #: (a target= answer is then read as the chat's final turn; False: no encoding).
    reads_answer_lead: bool = False

    def encode_prompt(
        self, chat: Any, answer: str | None = None, answer_keys: Mapping[str, Any] | None = None
    ) -> EncodedChat:
        """The prompt before ``answer``, a given answer to explain (None: one still
        to generate), whose message holds ``answer_keys`` beside its content (a
        ``reasoning_content``). By default the generation prompt (:meth:`encode`);
        an adapter whose chat template renders a given answer after more
        template text than its generation prompt holds puts that text in the
        prompt."""
        if answer_keys:  # they would go unread
            raise InvalidContentError(
                f"{type(self).__name__} reads an answer's text alone, not {sorted(answer_keys)}"
            )
        return self.encode(chat)

    def check_text(self, turns: Any) -> None:
        """Refuse text that holds one of the tokenizer's control tokens: the
        tokenizer would read ``<|im_start|>`` inside a message as chat
        structure, not as the characters the user wrote.

        Args:
            turns (Chat or list of Turn): the turns to check.

        Raises:
            InvalidContentError: a text part, or a message key's value (a tool
                call's arguments), contains a control token.
        """
        controls = self._control_tokens
        for turn in turns:
            # A tool call's arguments and a reasoning are rendered as text too.
            extra = json.dumps(getattr(turn, "extra", {}), default=str, ensure_ascii=False)
            for text in [getattr(part, "text", "") for part in turn.parts] + [extra]:
                found = [c for c in controls if c in text]
                if found:
                    token = found[0]
                    spaced = f"{token[0]} {token[1:-1]} {token[-1]}" if len(token) > 2 else ""
                    raise InvalidContentError(
                        f"the {turn.role} turn's text contains the model's control token "
                        f"{token!r}, which the tokenizer would read as chat structure; "
                        f"remove it, or break it up (e.g. {spaced!r}) to keep it as text"
                    )

    @functools.cached_property
    def _control_tokens(self) -> tuple[str, ...]:
        tok = self.tokenizer
        special = set(getattr(tok, "all_special_tokens", ()) or ())
        for added in (getattr(tok, "added_tokens_decoder", None) or {}).values():
            if getattr(added, "special", False):
                special.add(str(added))
        return tuple(sorted(t for t in special if t.strip()))

    # Responses -----------------------------------------------------------------------

    @abstractmethod
    def response(self, ids: Tensor) -> Response:
        """Wrap the adapter's own response ids (as ``generate_masked`` makes them)."""

    @abstractmethod
    def strip_response(
        self, response: Response, eos_token_id: int | list[int] | None = None
    ) -> Response:
        """The response without its trailing end-of-turn, end-of-sequence and
        padding, and the generate call's own ``eos_token_id`` where it took one."""

    @property
    def vocab_size(self) -> int | None:
        """Number of token ids the model reads (None when unknown)."""
        size = getattr(self.tokenizer, "vocab_size", None)
        return len(self.tokenizer) if hasattr(self.tokenizer, "__len__") else size

    @property
    def max_positions(self) -> int | None:
        """Positions the model was trained on (its ``max_position_embeddings``;
        None when unknown)."""
        config = getattr(getattr(self, "model", None), "config", None)
        text_config = getattr(config, "get_text_config", None)
        config = text_config() if callable(text_config) else config
        limit = getattr(config, "max_position_embeddings", None)
        return int(limit) if isinstance(limit, int) else None

    @functools.cached_property
    def position_table(self) -> int | None:
        """Rows of the model's learned absolute position table (GPT-2's ``wpe``,
        OPT's ``embed_positions``, less its offset): it reads no position past
        them. None for relative positions (rotary, ALiBi), which run on."""
        model = getattr(self, "model", None)
        embeddings = getattr(model, "get_input_embeddings", None)
        if not isinstance(model, nn.Module) or not callable(embeddings):
            return None
        tokens = embeddings()
        # The table beside the token embeddings: an audio or vision tower's is not the text's.
        for name, module in model.named_modules():
            if module is tokens:
                owner = model.get_submodule(name.rpartition(".")[0])
                break
        else:
            return None
        for name in _POSITION_TABLES:
            table = getattr(owner, name, None)
            if isinstance(table, nn.Embedding):
                return table.num_embeddings - int(getattr(table, "offset", 0))
        return None

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """Text sampling settings a sampled answer takes where none is given
        (``temperature``, ``top_k``, ``top_p``, ``min_p``): here the plain
        distribution; a Hugging Face model's are its generation config's."""
        return {"temperature": 1.0, "top_k": None, "top_p": None, "min_p": None}

    def check_target(self, target: Tensor) -> Response:
        """A user-given target as a response.

        Args:
            target (Tensor): integer ids of shape ``(T,)`` or ``(1, T)`` (the shape
                of ``tokenizer(..., return_tensors="pt").input_ids``).

        Returns:
            Response: the target.

        Raises:
            TargetError: another shape, non-integer values or ids outside the vocabulary.
        """
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TargetError(
                f"target ids must be integers, got {target.dtype}; pass token ids or a str"
            )
        if target.dim() == 2 and target.shape[0] == 1:
            target = target[0]
        if target.dim() != 1:
            raise TargetError(f"target ids must be (T,) or (1, T), got {tuple(target.shape)}")
        size = self.vocab_size
        bad = (target < 0) | (target >= size) if size is not None else target < 0
        if bool(bad.any()):
            raise TargetError(
                f"target ids {target[bad].tolist()[:5]} are outside the vocabulary "
                f"(0..{size - 1 if size else '?'})"
            )
        return self.response(target.long())

    def text_response(self, text: str) -> Response:
        """A response given as text, tokenized without special tokens."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        self.check_token_ids(ids)
        return self.response(torch.tensor(ids))

    def answer_response(self, encoded: EncodedChat, text: str) -> Response:
        """``text``, the answer to explain, read as the model reads it after
        ``encoded``'s prompt. Default: :meth:`text_response`."""
        return self.text_response(text)

    def check_token_ids(self, ids: list[int]) -> None:
        """Refuse token ids past the model's embedding rows: a tokenizer given
        tokens the model never got (``add_tokens`` without
        ``resize_token_embeddings``) failed deep inside its forward."""
        size = self.vocab_size
        top = max(ids, default=-1)
        if size is not None and top >= size:
            raise InvalidModelError(
                f"the tokenizer gives token id {top} ({self.tokenizer.decode([top])!r}), past the "
                f"model's {size} embedding rows: it holds tokens the model lacks (after "
                "tokenizer.add_tokens, call model.resize_token_embeddings(len(tokenizer)))"
            )

    # Scoring and generation ----------------------------------------------------------

    def prefill(self, masked: MaskedChat) -> Any:
        """Run the untouched prefix once; None when the adapter cannot reuse it."""
        return None

    def pushed_lengths(self, masked: MaskedChat, prefix: Any = None) -> Tensor:
        """``(B,)``: about how many positions each coalition makes the model
        push (to batch coalitions of similar cost together)."""
        return masked.present.sum(1)

    @abstractmethod
    def masked_inputs(self, masked: MaskedChat) -> list[Tensor]:
        """What the model reads for each coalition: ``(L_b,)`` token ids or
        ``(L_b, D)`` input embeddings; absent positions are gone under the
        ``"drop"`` baselines and replaced under the others."""

    @abstractmethod
    def score_masked(
        self,
        masked: MaskedChat,
        response: Response,
        prefix: Any = None,
        per_step: bool = False,
    ) -> Tensor:
        """Teacher-forced log-probability of each response token after each coalition.

        Args:
            masked (MaskedChat): B coalitions of one chat.
            response (Response): the response to score.
            prefix (Any, optional): state from :meth:`prefill` of the first
                ``masked.prefix_len`` positions.
            per_step (bool, optional): score one response token per forward
                (Captum's ``forward_in_tokens=True``); same values, slower.

        Returns:
            Tensor: ``(B, len(response))`` float32 log-probabilities.
        """

    @abstractmethod
    def generate_masked(
        self, masked: MaskedChat, seeds: list[int] | None = None, **gen_args: Any
    ) -> list[Response]:
        """Continue each coalition (greedy, or sampled with ``do_sample``).

        Args:
            masked (MaskedChat): B coalitions.
            seeds (list of int, optional): one seed per coalition; sampled tokens
                of row b depend on ``seeds[b]`` only, never on the other rows.
            **gen_args: generation settings (``max_new_tokens``, ``do_sample``,
                ``temperature``, ``top_k``, and the adapter's own).

        Returns:
            list of Response: B responses, each up to and including its end token.
        """

    # Gradients (for gradient and attention methods; optional) -------------------------

    def input_embeddings(self, encoded: EncodedChat) -> Tensor:
        """``(L, D)`` input embeddings of every position of an encoded chat
        (text token embeddings; for speech models the audio encoder's output).

        Raises:
            NotImplementedError: the adapter has no gradient path.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not expose its input embeddings; gradient "
            "attribution needs input_embeddings and next_token_log_probs"
        )

    def next_token_log_probs(self, embeds: Tensor, response: Response, token: int) -> Tensor:
        """Log-probability ``(B,)`` of response token ``token`` after the prompt
        embeddings ``(B, L, D)`` and the response's earlier tokens, with
        gradients flowing to ``embeds``.

        Raises:
            NotImplementedError: the adapter has no gradient path.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no differentiable scoring (next_token_log_probs)"
        )

    def response_log_prob(self, embeds: Tensor, response: Response) -> Tensor:
        """Log-probability ``(B,)`` of the whole response after the prompt
        embeddings ``(B, L, D)``, with gradients flowing to ``embeds``. By
        default one :meth:`next_token_log_probs` forward a token; adapters
        score every token in one teacher-forced forward."""
        scores = [self.next_token_log_probs(embeds, response, t) for t in range(len(response))]
        return torch.stack(scores).sum(0)

    def attention_inputs(
        self, encoded: EncodedChat, response: Response
    ) -> tuple[nn.Module, dict[str, Tensor]]:
        """The transformers model whose attention weights an attention attribution
        reads, and its inputs for the prompt followed by the response but its
        last token (one forward, every position predicting the next).

        Raises:
            InvalidModelError: the adapter has no such model.
        """
        raise InvalidModelError(f"{type(self).__name__} does not return attention weights")

    # Embeddings of responses (for similarity value functions) ------------------------

    @abstractmethod
    def token_embeddings(self, response: Response) -> Tensor:
        """``(len(response), d)`` rows of the model's input embedding table."""

    @abstractmethod
    def response_states(
        self, responses: list[Response], context: EncodedChat | None = None
    ) -> list[Tensor]:
        """Last hidden states over each response, ``(n_i, d)``, read alone or
        after ``context`` (the full chat)."""
