"""transformers' generation settings as :class:`HFCausalLMAdapter` applies
them: each coalition's row sampled with its own seeded generator, from what
transformers' own warpers leave, and its end found as a row generated alone
would end."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from captum_mllm.models.decoder import draw_tokens

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
