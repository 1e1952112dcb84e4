"""Generation through transformers' ``generate`` as :class:`HFCausalLMAdapter`
runs it (:class:`HFGeneration`): the coalitions' rows in one left-padded batch,
each sampled with its own seeded generator, from what transformers' own
warpers leave, and its end found as a row generated alone would end."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from captum_mllm.encoding import MaskedChat
from captum_mllm.errors import InvalidOptionError
from captum_mllm.models.base import Response
from captum_mllm.models.batching import pad_rows
from captum_mllm.models.decoder import DecoderLMAdapter
from captum_mllm.models.sampling import check_sampling, draw_tokens, row_generators

#: transformers' defaults of its sampling settings (4's GenerationConfig holds
#: them; 5's leaves them None and fills them in at generate time).
HF_SAMPLING = {
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "top_h": None,
}

DEFAULT_GEN_ARGS: dict[str, Any] = {"max_new_tokens": 25, "do_sample": False}


def logits_warpers(sampling: dict[str, Any], device: torch.device) -> list[Any]:
    """transformers' own logits warpers for these settings, in the order and
    under the conditions ``model.generate(do_sample=True)`` chains them."""
    from transformers import generation as g

    out: list[Any] = []
    if sampling["temperature"] not in (None, 1.0):
        out.append(g.TemperatureLogitsWarper(sampling["temperature"]))
    if sampling["top_h"] is not None:  # transformers 5
        out.append(g.logits_process.TopHLogitsWarper(top_h=sampling["top_h"]))  # type: ignore[attr-defined]
    if sampling["top_k"]:
        out.append(g.TopKLogitsWarper(top_k=sampling["top_k"]))
    if sampling["top_p"] is not None and sampling["top_p"] < 1.0:
        out.append(g.TopPLogitsWarper(top_p=sampling["top_p"]))
    if sampling["min_p"] is not None:
        out.append(g.MinPLogitsWarper(min_p=sampling["min_p"]))
    if sampling["typical_p"] is not None and sampling["typical_p"] < 1.0:
        out.append(g.TypicalLogitsWarper(mass=sampling["typical_p"]))
    if sampling["epsilon_cutoff"] and 0.0 < sampling["epsilon_cutoff"] < 1.0:
        out.append(g.EpsilonLogitsWarper(epsilon=sampling["epsilon_cutoff"]))
    if sampling["eta_cutoff"] and 0.0 < sampling["eta_cutoff"] < 1.0:
        out.append(g.EtaLogitsWarper(epsilon=sampling["eta_cutoff"], device=str(device)))
    return out


class SeededSampling:
    """A transformers logits processor that samples each row, from what
    transformers' warpers leave (:func:`logits_warpers`), with its own generator and
    leaves only the drawn token, so greedy decoding returns it. Temperature 0
    (or top-k 1) is greedy, as in liquid-audio's sampler."""

    def __init__(
        self, warpers: list[Any], generators: list[torch.Generator] | None, greedy: bool
    ) -> None:
        self.warpers, self.generators, self.greedy = warpers, generators, greedy

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.greedy:
            chosen = scores.argmax(-1)
        else:
            warped = scores.float()
            for warper in self.warpers:
                warped = warper(input_ids, warped)
            chosen = draw_tokens(warped.softmax(-1), self.generators)
        out = torch.full_like(scores, -float("inf"))
        out[torch.arange(len(scores)), chosen] = 0.0
        return out


def stop_string_end(row: list[int], stop_strings: str | list[str], tokenizer: Any) -> int:
    """The tokens of ``row`` up to the first that completes a stop string (all of
    them when none does), as transformers' ``StopStringCriteria`` stops a row
    generated alone; found by bisection, as text only grows with its tokens."""
    wanted = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)

    def stopped(n: int) -> bool:
        text = tokenizer.decode(row[:n])
        return any(s in text for s in wanted)

    if not stopped(len(row)):
        return len(row)
    low, high = 1, len(row)  # stopped(high) holds
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if stopped(mid) else (mid + 1, high)
    return high


def eos_ids(model: Any, tokenizer: Any, given: int | list[int] | None = None) -> set[int]:
    """The end tokens: the generation config's, the tokenizer's and ``given``
    (a generate call's own ``eos_token_id``)."""
    ids: set[int] = set()
    config = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config, getattr(tokenizer, "eos_token_id", None), given):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    return ids


def pad_id(tokenizer: Any) -> int:
    """The id that pads a batch: the pad token, else EOS, else unk, else 0."""
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


class HFGeneration(DecoderLMAdapter):
    """Batched, seeded generation through a Hugging Face model's ``generate``
    (see :class:`~captum_mllm.models.hf_causal.HFCausalLMAdapter`)."""

    model: Any
    tokenizer: Any
    _is_hf: bool

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """The model's generation config's ``temperature``, ``top_k``, ``top_p``
        and ``min_p`` (transformers' 1.0, 50, 1.0 and none where it sets none),
        which ``model.generate(do_sample=True)`` samples with."""
        config = getattr(self.model, "generation_config", None)
        found = {k: getattr(config, k, None) for k in HF_SAMPLING}
        return {k: v if found[k] is None else found[k] for k, v in HF_SAMPLING.items()}

    def _generate(
        self, masked: MaskedChat, seeds: list[int] | None = None, **gen_args: Any
    ) -> list[Response]:
        """Continue each coalition with ``model.generate``, left-padded in one batch.

        Sampling (``do_sample``, with ``temperature``, ``top_k``, ``top_p``,
        ``min_p``, ``typical_p``, ``epsilon_cutoff``, ``eta_cutoff`` and ``top_h``
        where given, else the model's generation config's) draws each row's
        tokens, from what transformers' own warpers leave, with its own
        generator seeded by ``seeds[b]``, so a row's answer does not depend on
        the rows beside it.

        Returns:
            list of Response: the new tokens of each row, up to and including EOS.
        """
        pad = pad_id(self.tokenizer)
        ids, mask = pad_rows(masked.rows(), pad, left=True, device=self.device)
        width = ids.shape[1]
        args = {**DEFAULT_GEN_ARGS, **gen_args}
        for key in ("audio_temperature", "audio_top_k"):  # a text model has no audio to sample
            args.pop(key, None)
        if args.get("num_return_sequences") not in (None, 1):
            raise InvalidOptionError(
                "one answer per coalition: num_return_sequences must be 1 "
                "(EmbeddingSimilarity's samples_per_coalition draws several, seeded)"
            )
        given = {k: args.pop(k, None) for k in HF_SAMPLING}
        if args.pop("do_sample", False):  # unset ones: the model's, as model.generate's
            defaults = self.sampling_defaults
            sampling = {k: defaults[k] if v is None else v for k, v in given.items()}
            check_sampling(sampling)
            generators = row_generators(seeds, self.device)
            greedy = not sampling["temperature"] or sampling["top_k"] == 1
            warpers = [] if greedy else logits_warpers(sampling, self.device)
            args["logits_processor"] = [SeededSampling(warpers, generators, greedy)]
        args["do_sample"] = False  # sampled tokens come from the processor above
        if "max_length" in args:  # max_new_tokens (ours by default) won over it, unread
            raise InvalidOptionError(
                "give max_new_tokens, not max_length: max_length counts the prompt too, "
                "and each coalition's prompt has its own length"
            )
        if self._is_hf:
            args.setdefault("pad_token_id", pad)
            if args.get("stop_strings"):  # transformers finds them with the tokenizer
                args.setdefault("tokenizer", self.tokenizer)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, **args)  # type: ignore[operator]
        self.n_forward_calls += 1
        eos = eos_ids(self.model, self.tokenizer, args.get("eos_token_id"))
        result = []
        for row in out[:, width:].tolist():
            stop = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            if args.get("stop_strings"):  # a row it ended is padded while others go on
                stop = stop_string_end(row[:stop], args["stop_strings"], self.tokenizer)
            result.append(self.response(torch.tensor(row[:stop])))
        return result
