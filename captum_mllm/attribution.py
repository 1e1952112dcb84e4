"""MultimodalLLMAttribution: Captum's LLMAttribution, batched and cached.

Captum's perturbation method proposes coalitions; this class evaluates them:
identical coalitions once per call (the coalition cache), up to
``perturbations_per_eval`` of them in one model forward, with the prefix no
feature touches computed once and its key/value cache reused.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from captum.attr import (
    ImageMaskInput,
    InterpretableInput,
    LLMAttribution,
    PerturbationAttribution,
    TextTemplateInput,
    TextTokenInput,
)
from captum.attr._core.llm_attr import DEFAULT_GEN_ARGS, _convert_ids_to_pretty_tokens
from torch import Tensor

from captum_mllm.errors import (
    InvalidModelError,
    InvalidOptionError,
    TargetError,
    UnsupportedInputError,
)
from captum_mllm.inputs import ChatInput
from captum_mllm.models.base import ModelAdapter
from captum_mllm.models.hf_causal import HFCausalLMAdapter
from captum_mllm.result import MultimodalLLMAttributionResult
from captum_mllm.targets import LogProbTarget


class CoalitionCache:
    """Evaluates batches of coalitions, each distinct coalition once.

    Args:
        evaluate (callable): ``(U, n_features) -> (U, k)`` for unique coalitions.
        enabled (bool, optional): when False, every coalition is evaluated.
            Default: True
    """

    def __init__(self, evaluate: Callable[[Tensor], Tensor], enabled: bool = True) -> None:
        self.evaluate = evaluate
        self.enabled = enabled
        self.values: dict[bytes, Tensor] = {}
        self.n_requested = 0
        self.n_evaluated = 0
        self.n_columns = 1

    def __call__(self, perturbed: Tensor) -> Tensor:
        # (B, n_features) -> (B, k)
        rows = perturbed.reshape(perturbed.shape[0], -1)
        self.n_requested += len(rows)
        if not self.enabled:
            self.n_evaluated += len(rows)
            return self.evaluate(rows)
        keys = [row.detach().cpu().numpy().tobytes() for row in rows]
        first_index: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key not in self.values:
                first_index.setdefault(key, i)
        if first_index:
            fresh = self.evaluate(rows[list(first_index.values())])
            self.n_evaluated += len(first_index)
            self.values.update(zip(first_index, fresh, strict=True))
        return torch.stack([self.values[key] for key in keys])


class MultimodalLLMAttribution(LLMAttribution):
    """Explain a (multimodal) chat model's response with a Captum perturbation method.

    A drop-in for Captum's ``LLMAttribution``: it accepts the same methods,
    models, tokenizers and inputs (``TextTemplateInput``, ``TextTokenInput``,
    ``ImageMaskInput``) and gives the same values, plus :class:`ChatInput`.
    Unlike stock Captum it evaluates ``perturbations_per_eval`` coalitions in
    one forward, evaluates each distinct coalition once, and reuses the key/value
    cache of the untouched prefix. Every combination of Captum's
    ``forward_in_tokens`` / ``use_cached_outputs`` gives the values of the
    uncached sequence-level computation.

    Args:
        attr_method (PerturbationAttribution): FeatureAblation, ShapleyValues,
            ShapleyValueSampling, Lime or KernelShap, built on the model
            (an adapter, or a Hugging Face-style causal LM).
        tokenizer_or_adapter (ModelAdapter or tokenizer, optional): the adapter,
            or the tokenizer of a plain model (as in Captum). Default: the
            method's model when it is an adapter.
        attr_target (str, optional): ``"log_prob"`` or ``"prob"``. Default: ``"log_prob"``
        target (callable, optional): a value function such as
            :class:`LogProbTarget`; overrides ``attr_target``.

    Examples::

        >>> from captum.attr import ShapleyValueSampling
        >>> from captum_mllm import Chat, ChatInput, MultimodalLLMAttribution
        >>> from captum_mllm.testing import tiny_hf_adapter
        >>> model = tiny_hf_adapter()
        >>> inp = ChatInput(Chat().system("Be brief.").user("Who are you?"), model)
        >>> attr = MultimodalLLMAttribution(ShapleyValueSampling(model), model)
        >>> res = attr.attribute(inp, n_samples=8, perturbations_per_eval=16)
        >>> res.seq_attr.shape
        torch.Size([3])
    """

    SUPPORTED_INPUTS = (ChatInput, TextTemplateInput, TextTokenInput, ImageMaskInput)

    def __init__(
        self,
        attr_method: PerturbationAttribution,
        tokenizer_or_adapter: Any = None,
        attr_target: str = "log_prob",
        target: Any = None,
    ) -> None:
        if attr_target not in ("log_prob", "prob"):
            raise InvalidOptionError(
                f"attr_target must be 'log_prob' or 'prob', got {attr_target!r}; pass other "
                "value functions as target="
            )
        model = attr_method.forward_func
        if isinstance(tokenizer_or_adapter, ModelAdapter):
            adapter = tokenizer_or_adapter
        elif isinstance(model, ModelAdapter):
            adapter = model
        elif tokenizer_or_adapter is not None and isinstance(model, torch.nn.Module):
            adapter = HFCausalLMAdapter(model, tokenizer_or_adapter)
        else:
            raise InvalidModelError(
                f"the method is built on a {type(model).__name__}; build it on a model adapter "
                "(e.g. HFCausalLMAdapter(model, tokenizer)), or on a torch module and pass "
                "its tokenizer"
            )
        if not isinstance(attr_method, self.SUPPORTED_METHODS):
            raise UnsupportedInputError(
                f"{type(attr_method).__name__} is not supported; use one of "
                f"{', '.join(m.__name__ for m in self.SUPPORTED_METHODS)}"
            )
        super().__init__(attr_method, adapter.tokenizer, attr_target)
        self.adapter = adapter
        self.value_fn = target if target is not None else LogProbTarget(attr_target)
        # Multi-output methods attribute every output column (each target token,
        # or each sample of a sampled value function); the others the total only.
        self.multi_output: bool = isinstance(attr_method, self.SUPPORTED_PER_TOKEN_ATTR_METHODS)
        self.include_per_token_attr: bool = self.multi_output and self.value_fn.per_token

    def attribute(  # type: ignore[override]
        self,
        inp: InterpretableInput,
        target: str | Tensor | None = None,
        num_trials: int = 1,
        gen_args: dict[str, Any] | None = None,
        use_cached_outputs: bool = True,
        _inspect_forward: Callable[..., None] | None = None,
        forward_in_tokens: bool = False,
        cache_coalitions: bool = True,
        reuse_prefix: bool = True,
        keep_eos: bool = False,
        **kwargs: Any,
    ) -> MultimodalLLMAttributionResult:
        """Attribute the response to the input's features.

        Args:
            inp (InterpretableInput): a :class:`ChatInput`, or one of Captum's
                ``TextTemplateInput``, ``TextTokenInput``, ``ImageMaskInput``.
            target (str or Tensor, optional): the response to explain: text, or
                token ids of shape ``(T,)`` or ``(1, T)``. None explains the chat's
                final assistant turn when it has one, else generates the answer
                greedily from the full input. Default: None
            num_trials (int, optional): attributions are averaged over this many
                runs of the method. Default: 1
            gen_args (dict, optional): generation arguments when ``target`` is
                None. Default: ``{"max_new_tokens": 25, "do_sample": False}``
            use_cached_outputs (bool, optional): accepted for Captum
                compatibility; values never depend on it. Default: True
            forward_in_tokens (bool, optional): score one response token per
                forward, as Captum's default does. Same values, slower.
                Default: False
            cache_coalitions (bool, optional): evaluate each distinct coalition
                once per call. Default: True
            reuse_prefix (bool, optional): compute the prefix no feature
                touches once. Default: True
            keep_eos (bool, optional): keep the end-of-turn / end-of-sequence
                tokens that end a generated answer as output tokens to explain
                (a :class:`ChatInput`'s generated target drops them by default;
                Captum's own inputs keep them, as stock Captum does). Default: False
            **kwargs: passed to the method's ``attribute`` (``n_samples``,
                ``perturbations_per_eval``, ``show_progress``, ...).

        Returns:
            MultimodalLLMAttributionResult: ``token_attr`` is None for Lime and
            KernelShap.
        """
        if not isinstance(inp, self.SUPPORTED_INPUTS):
            raise UnsupportedInputError(
                f"{type(inp).__name__} is not supported; use ChatInput or one of Captum's "
                "TextTemplateInput, TextTokenInput, ImageMaskInput"
            )
        if isinstance(num_trials, bool) or not isinstance(num_trials, int) or num_trials < 1:
            raise InvalidOptionError(f"num_trials must be an int of at least 1, got {num_trials!r}")
        start = time.perf_counter()
        calls_before = self.adapter.n_forward_calls
        target_ids = self._target_ids(inp, target, gen_args, keep_eos)
        responses: dict[tuple[int, ...], Any] = {}
        evaluate = self._evaluator(inp, target_ids, forward_in_tokens, reuse_prefix, responses)
        cache = CoalitionCache(evaluate, enabled=cache_coalitions)
        n_extra = self.value_fn.n_extra_outputs(len(target_ids)) if self.multi_output else 0
        cache.n_columns = 1 + n_extra

        attr = torch.zeros(1 + n_extra, inp.n_itp_features, dtype=torch.float, device=self.device)
        for _ in range(num_trials):
            cur = self.attr_method.attribute(
                inp.to_tensor().to(self.device),
                additional_forward_args=(cache,),  # not a tensor: Captum passes it as is
                **kwargs,
            )
            attr += cur.reshape(attr.shape)
        attr = inp.format_attr(attr / num_trials)

        per_sample = n_extra > 0 and not self.include_per_token_attr
        return MultimodalLLMAttributionResult(
            seq_attr=attr[0],
            token_attr=attr[1:] if self.include_per_token_attr else None,
            seq_attr_std=attr[1:].std(dim=0) if per_sample else None,
            responses=responses or None,
            input_tokens=list(inp.values),
            output_tokens=self._pretty_tokens(inp, target_ids),
            inp=inp,
            features=getattr(inp, "features", None),
            target_ids=target_ids,
            n_model_calls=self.adapter.n_forward_calls - calls_before,
            n_coalitions=cache.n_requested,
            n_unique_coalitions=cache.n_evaluated,
            wall_time=time.perf_counter() - start,
            output_audio=self.adapter.output_audio(target_ids),
        )

    def _forward_func(self, perturbed_tensor: Tensor, cache: CoalitionCache) -> Tensor:  # type: ignore[override]
        # (B, n_features) -> (B, n_columns) for multi-output methods, else (B,)
        values = cache(perturbed_tensor)
        return values[:, : cache.n_columns] if cache.n_columns > 1 else values[:, 0]

    def _evaluator(
        self,
        inp: InterpretableInput,
        target_ids: Tensor,
        per_step: bool,
        reuse_prefix: bool,
        responses: dict[tuple[int, ...], Any],
    ) -> Callable[[Tensor], Tensor]:
        if isinstance(inp, ChatInput):
            needs_prefix = reuse_prefix and isinstance(self.value_fn, LogProbTarget)
            prefix = self.adapter.prefill(inp.to_model_input()) if needs_prefix else None
            decode = self.adapter.decode_response

            def evaluate_chat(coalitions: Tensor) -> Tensor:
                masked = inp.to_model_input(coalitions)
                values = self.value_fn(self.adapter, masked, target_ids, prefix, per_step)
                said = getattr(self.value_fn, "last_responses", None)
                if said:  # regenerated answers, k per coalition when sampling
                    k = len(said) // len(coalitions)
                    for i, c in enumerate(coalitions):
                        texts = [decode(r) for r in said[i * k : (i + 1) * k]]
                        responses[tuple(int(v) for v in c.tolist())] = texts[0] if k == 1 else texts
                return values

            return evaluate_chat
        if not isinstance(self.value_fn, LogProbTarget):
            raise UnsupportedInputError("Captum's inputs support the log-prob target only")
        if isinstance(inp, ImageMaskInput):
            return self._stock_evaluator(inp, target_ids, per_step)
        adapter = self.adapter
        if not isinstance(adapter, HFCausalLMAdapter):
            raise UnsupportedInputError(
                "Captum's text inputs need a text model (HFCausalLMAdapter)"
            )
        value_fn = self.value_fn

        def evaluate_text(coalitions: Tensor) -> Tensor:
            rows = [self._input_ids(inp, c[None]) for c in coalitions]
            return value_fn.from_log_probs(adapter.score(rows, target_ids, None, per_step))

        return evaluate_text

    def _stock_evaluator(
        self, inp: InterpretableInput, target_ids: Tensor, per_step: bool
    ) -> Callable[[Tensor], Tensor]:
        """Model inputs from a processor (images) are model-specific: run Captum's
        own single-coalition forward, uncached, one coalition at a time."""
        include = self.include_per_token_attr

        def evaluate_stock(coalitions: Tensor) -> Tensor:
            self.include_per_token_attr = True
            try:
                outs = []
                for c in coalitions:
                    if per_step:
                        out = self._forward_func_by_tokens(c[None], inp, target_ids, False)
                    else:
                        out = self._forward_func_by_seq(c[None], inp, target_ids)
                    self.adapter.n_forward_calls += len(target_ids) if per_step else 1
                    outs.append(out.reshape(-1))
                return torch.stack(outs)
            finally:
                self.include_per_token_attr = include

        return evaluate_stock

    def _input_ids(self, inp: InterpretableInput, coalition: Tensor | None = None) -> Tensor:
        model_input = inp.to_model_input(coalition)
        if isinstance(model_input, str):
            return torch.as_tensor(self.tokenizer.encode(model_input)).reshape(-1)
        return torch.as_tensor(model_input).reshape(-1)

    def _target_ids(
        self,
        inp: InterpretableInput,
        target: str | Tensor | None,
        gen_args: dict[str, Any] | None,
        keep_eos: bool,
    ) -> Tensor:
        if target is None and isinstance(inp, ChatInput) and inp.response is not None:
            if gen_args is not None:
                raise TargetError(
                    "gen_args is unused: the chat's final assistant turn is the target"
                )
            target = inp.response
        if target is None:
            ids = self._generate_target(inp, gen_args)
            if isinstance(inp, ChatInput) and not keep_eos:
                ids = self.adapter.strip_response(ids)
        elif gen_args is not None:
            raise TargetError("gen_args is only used when target is None")
        elif isinstance(target, str):
            ids = torch.tensor(self.tokenizer.encode(target, add_special_tokens=False))
        elif isinstance(target, Tensor):
            ids = self.adapter.check_target(target)
        else:
            raise TargetError(
                f"target must be a str, a Tensor or None, got {type(target).__name__}"
            )
        if ids.numel() == 0:
            raise TargetError("the target response is empty; give a non-empty target")
        return ids.long().to(self.device)

    def _generate_target(self, inp: InterpretableInput, gen_args: dict[str, Any] | None) -> Tensor:
        default = getattr(self.value_fn, "gen_args", None) or DEFAULT_GEN_ARGS
        args = {**default, **(gen_args or {})}
        if isinstance(inp, ChatInput):
            if getattr(self.value_fn, "sampled", False):
                args["do_sample"] = False  # the reference answer is the greedy one
            return self.adapter.generate_masked(inp.to_model_input(), **args)[0]
        model_inp = self._format_model_input(inp.to_model_input())
        prompt = model_inp["input_ids"]
        model_inp.setdefault("attention_mask", torch.ones_like(prompt))
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is not None:
            args.setdefault("pad_token_id", pad)
        ids = self.model.generate(**model_inp, **args)[0, prompt.shape[1] :]  # type: ignore[operator]
        self.adapter.n_forward_calls += 1
        return ids

    def _pretty_tokens(self, inp: InterpretableInput, ids: Tensor) -> list[str]:
        if isinstance(inp, ChatInput):
            return self.adapter.decode_tokens(ids)
        return _convert_ids_to_pretty_tokens(ids, self.tokenizer)  # as stock Captum labels them
