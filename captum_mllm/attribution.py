"""MultimodalLLMAttribution: Captum's LLMAttribution, batched, cached and resumable.

Captum's perturbation method proposes coalitions; a
:class:`~captum_mllm.coalitions.CoalitionEvaluator` answers them, each
distinct coalition once, up to ``perturbations_per_eval`` of them in one
model forward, through a store that can outlive the process. The values come
from the target (a pure value function) applied to the adapter.
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Callable
from dataclasses import replace
from os import PathLike
from typing import Any

import numpy as np
import torch
from captum.attr import (
    FeaturePermutation,
    ImageMaskInput,
    InterpretableInput,
    LLMAttribution,
    PerturbationAttribution,
    ShapleyValues,
    TextTemplateInput,
    TextTokenInput,
)
from torch import Tensor

from captum_mllm import captum_compat
from captum_mllm.answers import answered_input, require_same_model, resolve_response
from captum_mllm.coalitions import CoalitionEvaluator, CoalitionStore
from captum_mllm.encoding import coalition_key
from captum_mllm.errors import (
    InvalidModelError,
    InvalidOptionError,
    TargetError,
    UnsupportedInputError,
    require_built,
    require_int,
    warn_caller,
)
from captum_mllm.games import BaselineDraws, MethodCall, ValueGame, inspected, value_game
from captum_mllm.heap import retained_heap
from captum_mllm.inputs import ChatInput
from captum_mllm.method_args import check_method_kwargs, trial_seed
from captum_mllm.methods import HierarchicalShapley, ShapleyEstimator
from captum_mllm.methods.hierarchical import split_wide
from captum_mllm.models.base import ModelAdapter, Response, in_eval_mode
from captum_mllm.models.batching import default_perturbations_per_eval
from captum_mllm.records import (
    chat_fields,
    check_store_arguments,
    open_store,
    provenance,
    replay_draws,
)
from captum_mllm.result import MultimodalLLMAttributionResult
from captum_mllm.targets import EmbeddingSimilarity, LogProbTarget, Target

#: Features from which Captum's ``ShapleyValues`` (all n! orders, walked in
#: Python: 7 features take seconds, 10 about half an hour on a CPU) draws a
#: warning that names :class:`~captum_mllm.methods.ExactShapleyValues`.
ALL_ORDERS_WARNING = 7


class MultimodalLLMAttribution(LLMAttribution):
    """Explain a (multimodal) chat model's response with a Captum perturbation method.

    A drop-in for Captum's ``LLMAttribution``: it accepts the same methods,
    models, tokenizers and inputs (``TextTemplateInput``, ``TextTokenInput``,
    ``ImageMaskInput``) and gives the same values, plus :class:`ChatInput`.
    Unlike stock Captum it evaluates ``perturbations_per_eval`` coalitions in
    one forward, evaluates each distinct coalition once, reuses the key/value
    cache of the untouched prefix, and can keep every evaluated coalition in a
    SQLite store to resume an interrupted run. ``ShapleyValueSampling`` asks for
    one order's coalitions at a time; they are drawn ahead (as Captum will draw
    them) and evaluated in full batches, so its values are unchanged.

    Args:
        attr_method (PerturbationAttribution): FeatureAblation, ShapleyValues,
            ShapleyValueSampling, Lime or KernelShap, built on the model
            (an adapter, or a torch module such as a Hugging Face causal LM).
        tokenizer_or_adapter (ModelAdapter or tokenizer, optional): the adapter,
            or the tokenizer of a plain model (as in Captum). Default: the
            method's model when it is an adapter.
        attr_target (str, optional): ``"log_prob"`` or ``"prob"``. Default: ``"log_prob"``
        target (Target, optional): a value function such as
            :class:`~captum_mllm.targets.EmbeddingSimilarity`, in place of
            ``attr_target`` (both given raise).

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
    SUPPORTED_METHODS = (*LLMAttribution.SUPPORTED_METHODS, ShapleyEstimator)
    SUPPORTED_PER_TOKEN_ATTR_METHODS = (
        *LLMAttribution.SUPPORTED_PER_TOKEN_ATTR_METHODS,
        ShapleyEstimator,
    )

    def __init__(
        self,
        attr_method: PerturbationAttribution,
        tokenizer_or_adapter: Any = None,
        attr_target: str = "log_prob",
        target: Target | None = None,
    ) -> None:
        if attr_target not in ("log_prob", "prob"):
            raise InvalidOptionError(
                f"attr_target must be 'log_prob' or 'prob', got {attr_target!r}; pass other "
                "value functions as target="
            )
        if target is not None and not isinstance(target, Target):
            raise TargetError(
                f"target= takes a Target (LogProbTarget, EmbeddingSimilarity, ...), "
                f"got {type(target).__name__}"
            )
        if target is not None and attr_target != "log_prob":  # it would go unread
            raise InvalidOptionError(
                f"attr_target={attr_target!r} is not read beside target=: choose the value "
                "function once (e.g. target=LogProbTarget('prob'))"
            )
        require_built(attr_method)
        model = attr_method.forward_func
        if isinstance(tokenizer_or_adapter, ModelAdapter):
            adapter = tokenizer_or_adapter
            require_same_model(attr_method, adapter)
        elif isinstance(model, ModelAdapter):
            adapter = model
        elif tokenizer_or_adapter is not None and isinstance(model, torch.nn.Module):
            adapter = captum_compat.adapter_for(model, tokenizer_or_adapter)
        else:
            raise InvalidModelError(
                f"the method is built on a {type(model).__name__}; build it on a model adapter "
                "(e.g. HFCausalLMAdapter(model, tokenizer), or HFCausalLMAdapter(pipeline)), or "
                "on a torch module and pass its tokenizer"
            )
        if not isinstance(attr_method, self.SUPPORTED_METHODS):
            raise UnsupportedInputError(
                f"{type(attr_method).__name__} is not supported; use one of "
                f"{', '.join(m.__name__ for m in self.SUPPORTED_METHODS)}"
            )
        if isinstance(attr_method, FeaturePermutation):  # a FeatureAblation to Captum
            raise UnsupportedInputError(
                "FeaturePermutation shuffles each feature across the examples of a batch; "
                "an explanation holds one chat, so every value came out 0: use "
                "FeatureAblation(model)"
            )
        super().__init__(attr_method, adapter.tokenizer, attr_target)
        # The method calls our evaluator, not the model (Captum's LLMAttribution
        # does the same with its private ``_forward_func``).
        self.attr_method.forward_func = self._evaluate_call
        self.adapter = adapter
        self.value_fn: Target = target if target is not None else LogProbTarget(attr_target)
        # Multi-output methods attribute every value column (each output token,
        # or each sample of a sampled value function); the others the total only.
        self.multi_output: bool = isinstance(attr_method, self.SUPPORTED_PER_TOKEN_ATTR_METHODS)
        self.include_per_token_attr: bool = self.multi_output and self.value_fn.per_token

    @retained_heap()  # each batch reuses the last one's freed memory (see heap.py)
    @in_eval_mode
    def attribute(  # type: ignore[override]
        self,
        inp: InterpretableInput,
        target: str | Tensor | None = None,
        num_trials: int = 1,
        gen_args: dict[str, Any] | None = None,
        use_cached_outputs: bool = True,
        _inspect_forward: Callable[..., None] | None = None,
        forward_in_tokens: bool | None = None,
        cache_coalitions: bool = True,
        reuse_prefix: bool = True,
        keep_eos: bool = False,
        store: str | PathLike[str] | CoalitionStore | None = None,
        shard: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> MultimodalLLMAttributionResult:
        """Attribute the response to the input's features.

        Args:
            inp (InterpretableInput): a :class:`ChatInput`, or one of Captum's
                ``TextTemplateInput``, ``TextTokenInput``, ``ImageMaskInput``.
            target (str or Tensor, optional): the response to explain: text,
                read as the chat's final assistant turn would be (after what the
                chat template renders before it), or token ids of shape ``(T,)``
                or ``(1, T)``, read after the generation prompt. None explains
                the chat's final assistant turn when it has one, else generates
                the answer greedily from the full input. Default: None
            num_trials (int, optional): attributions are averaged over this many
                runs of the method, each drawing its own coalitions (with our
                estimators' ``seed=``, the first trial uses that seed and each
                later one a seed derived from it). A Captum input that draws its
                baselines (``ProductBaselines``) draws them once per coalition and
                trial, seeded from Python's ``random`` (``random.seed`` repeats
                them; a store keeps the first run's). Default: 1
            gen_args (dict, optional): generation arguments when ``target`` is
                None. A ``ChatInput``'s answer is the greedy one: sampling
                settings (``do_sample``, ``temperature``, ``top_k``) raise, and
                the others add to the default. For Captum's own inputs they
                replace it, as in stock Captum.
                Default: ``{"max_new_tokens": 25, "do_sample": False}``
            use_cached_outputs (bool, optional): accepted for Captum
                compatibility; values never depend on it. Default: True
            _inspect_forward (callable, optional): Captum's debugging hook,
                called with (prompt text, response text, probabilities: the
                total, then each token's when attributed per token) for each
                distinct coalition evaluated. Default: None
            forward_in_tokens (bool, optional): score one response token per
                forward, as Captum does by default. None: token by token unless
                the model is known to be causal (our adapters, Hugging Face
                decoders), where one forward gives the same values. Default: None
            cache_coalitions (bool, optional): evaluate each distinct coalition
                once per call. Default: True
            reuse_prefix (bool, optional): compute the prefix no feature
                touches once. Default: True
            keep_eos (bool, optional): keep the end-of-turn / end-of-sequence
                tokens that end a generated answer as output tokens to explain
                (a :class:`ChatInput`'s generated target drops them by default;
                Captum's own inputs keep them, as stock Captum does). A given
                answer is explained as given: True beside one raises. Default: False
            store (str, PathLike or CoalitionStore, optional): a SQLite file
                keeping every evaluated coalition; a rerun with the same file and
                explanation evaluates only what is missing (resume): its
                samplers draw what the first run drew (ours without ``seed=``
                take that run's seed; Captum's samplers start from torch's
                generator as it was when that run began). Default: None
            shard (tuple of int, optional): ``(index, count)``: evaluate only this
                shard's coalitions (a stable hash splits them) into ``store``;
                the others count as 0, so the returned attributions are not the
                explanation. Once every shard has run, a call with the same
                store and no ``shard`` evaluates nothing and returns it exactly
                (see :func:`captum_mllm.distributed.explain_sharded`). Shards
                run on several machines need a store file each (SQLite's WAL
                needs a file's writers on one machine), joined by
                :meth:`~captum_mllm.SQLiteStore.merged`. The method must choose
                its coalitions without looking at values (no
                ``target_stderr``). Default: None
            **kwargs: passed to the method's ``attribute`` (``n_samples``,
                ``perturbations_per_eval``, ``show_progress``, ...). Unlike
                Captum's 1, ``perturbations_per_eval`` defaults to 64 coalitions
                a call on a CPU and 1,024 on an accelerator
                (:func:`~captum_mllm.models.batching.default_perturbations_per_eval`);
                values never depend on it. ``seed`` (int) seeds what the method
                draws: our estimators' own, and for Captum's samplers (and a
                ``ProductBaselines`` input) torch's, Python's and NumPy's
                generators during the call, put back after it.

        Returns:
            MultimodalLLMAttributionResult: ``token_attr`` is None for Lime and
            KernelShap.

        Examples::

            >>> res = attr.attribute(inp, n_samples=64, perturbations_per_eval=32,
            ...                      store="explanation.sqlite")
        """
        if not isinstance(inp, self.SUPPORTED_INPUTS):
            raise UnsupportedInputError(
                f"{type(inp).__name__} is not supported; use ChatInput or one of Captum's "
                "TextTemplateInput, TextTokenInput, ImageMaskInput"
            )
        if not isinstance(self.attr_method, ShapleyEstimator) and not captum_compat.drawing():
            # Captum's methods take no seed (a TypeError): theirs is torch's generator,
            # held for the run (another thread's draws there would move its values)
            seed = kwargs.pop("seed", None)  # None: unseeded, as ours read it
            seed = None if seed is None else require_int("seed", seed, 0)
            if seed is not None or captum_compat.draws_randomly(self.attr_method, inp):
                with captum_compat.global_draws(seed, self.device):
                    res = self.attribute(
                        inp, target=target, num_trials=num_trials, gen_args=gen_args,
                        use_cached_outputs=use_cached_outputs, _inspect_forward=_inspect_forward,
                        forward_in_tokens=forward_in_tokens, cache_coalitions=cache_coalitions,
                        reuse_prefix=reuse_prefix, keep_eos=keep_eos, store=store, shard=shard,
                        **kwargs,
                    )  # fmt: skip
                if seed is not None:
                    res.provenance["method_args"]["seed"] = seed
                return res
        require_int("num_trials", num_trials, 1)
        inp = answered_input(inp, target)
        drawn = captum_compat.draws_baselines(inp)  # ProductBaselines: seeded, per trial
        check_store_arguments(
            store, shard, cache_coalitions, drawn, num_trials, kwargs.get("target_stderr")
        )
        n = inp.n_itp_features
        check_method_kwargs(self.attr_method, n, kwargs)
        if type(self.attr_method) is ShapleyValues and n >= ALL_ORDERS_WARNING:
            warn_caller(
                f"Captum's ShapleyValues walks all {n}! = {math.factorial(n):,} orders of the "
                f"{n} features in Python; captum_mllm.methods.ExactShapleyValues gives the "
                f"same values from the {2**n:,} coalitions alone"
            )
        start = time.perf_counter()
        calls_before = self.adapter.thread_forward_calls()
        kwargs["perturbations_per_eval"] = require_int(  # Captum asserted; numpy ints pass
            "perturbations_per_eval",
            kwargs.get("perturbations_per_eval", default_perturbations_per_eval(self.device)),
            1,
        )
        if forward_in_tokens is not None and isinstance(self.value_fn, EmbeddingSimilarity):
            raise InvalidOptionError(  # it went unread: no answer token is scored
                f"{type(self.value_fn).__name__} regenerates each coalition's answer and "
                "scores no answer token: forward_in_tokens= is for log-probability targets"
            )
        per_step = not self.adapter.is_causal if forward_in_tokens is None else forward_in_tokens
        response, extra_calls = self._response(inp, target, gen_args, keep_eos)
        draws = BaselineDraws(random.getrandbits(62)) if drawn else None  # random.seed() repeats it
        game = value_game(self, inp, response, per_step, reuse_prefix, draws)
        if _inspect_forward is not None:
            evaluate = inspected(self, game, inp, response, _inspect_forward, draws)
            game = replace(game, evaluate=evaluate)
        opened = open_store(self, store, inp, response) if store is not None else None
        if opened is not None:
            kwargs = replay_draws(self.attr_method, opened, kwargs)
            if draws is not None:
                draws.seed = int(opened.first("baseline_seed", str(draws.seed)))
        first_draw = draws.seed if draws is not None else 0

        def new_evaluator() -> CoalitionEvaluator:
            return CoalitionEvaluator(
                game.evaluate,
                opened,
                enabled=cache_coalitions,
                shard=shard,
                placeholder_columns=game.n_columns,
                row_length=game.row_length,
            )

        evaluators = [new_evaluator()]
        n_columns = game.n_columns if self.multi_output else 1

        attr = torch.zeros(n_columns, inp.n_itp_features, dtype=torch.float, device=self.device)
        ours = isinstance(self.attr_method, ShapleyEstimator)
        method_kwargs = dict(kwargs)
        if ours:  # our estimators report standard errors (and read the feature tree)
            method_kwargs["return_stderr"] = True
            if isinstance(self.attr_method, HierarchicalShapley) and isinstance(inp, ChatInput):
                if "feature_mask" in kwargs and "tree" not in kwargs:
                    raise InvalidOptionError(
                        "HierarchicalShapley's tree comes from the ChatInput's features, which "
                        "feature_mask= regroups: group them with ChatInput(groups=) instead, "
                        "or give tree= over the mask's groups"
                    )
                if "tree" not in kwargs:  # a long sentence splits rather than being refused
                    tree = split_wide(inp.feature_tree(), self.attr_method.max_children)
                    method_kwargs["tree"] = tree
        errors: list[Tensor] = []  # our estimators' standard errors, one per trial
        requested = 0  # our estimators' coalitions asked for, before their own memo
        try:
            for trial in range(num_trials):
                if ours:
                    method_kwargs["seed"] = trial_seed(kwargs.get("seed"), trial)
                if draws is not None and trial:  # other baselines: other values, not cached
                    draws.seed = int(trial_seed(first_draw, trial) or 0)
                    evaluators.append(new_evaluator())
                evaluator = evaluators[-1]
                call = MethodCall(evaluator, n_columns)
                upcoming = captum_compat.sampled_coalitions(
                    self.attr_method,
                    inp.n_itp_features,
                    int(kwargs.get("n_samples", 25)),
                    kwargs.get("feature_mask"),
                )
                if upcoming is not None:
                    evaluator.prefetch(
                        upcoming,
                        int(kwargs.get("perturbations_per_eval", 1)),
                        show_progress=bool(kwargs.get("show_progress", False)),
                    )
                cur = self.attr_method.attribute(
                    inp.to_tensor().to(self.device),
                    additional_forward_args=(call,),
                    **method_kwargs,
                )
                if ours:
                    cur, stderr = cur
                    errors.append(stderr.reshape(attr.shape).to(attr))
                    requested += self.attr_method.last_n_requested
                attr += cur.reshape(attr.shape)
            probs = self._full_probs(game, evaluator, inp.n_itp_features)  # the store is open
        finally:
            if opened is not None and not isinstance(store, CoalitionStore):
                opened.close()
        attr = inp.format_attr(attr / num_trials)
        if not bool(torch.isfinite(attr).all()):
            warn_caller(
                f"{int((~torch.isfinite(attr)).sum())} attributions are NaN or infinite: the "
                "value function gave non-finite values for some coalitions (a float16 "
                "overflow? load the model in bfloat16 or float32)"
            )
        stderr = self._mean_stderr(errors) if ours else None
        if (
            isinstance(self.value_fn, LogProbTarget)
            and self.value_fn.kind == "prob"
            and probs is not None
        ):
            _warn_on_underflow(float(probs[0]), len(response))  # log-probs do not underflow

        per_token = game.columns == "tokens" and self.include_per_token_attr
        per_sample = game.columns == "samples" and n_columns > 1
        chat_input = inp if isinstance(inp, ChatInput) else None
        return MultimodalLLMAttributionResult(
            **(chat_fields(chat_input) if chat_input else {}),
            seq_attr=attr[0],
            token_attr=attr[1:] if per_token else None,
            seq_attr_std=attr[1:].std(dim=0) if per_sample else None,
            seq_attr_stderr=stderr[0] if stderr is not None else None,
            token_attr_stderr=stderr[1:] if stderr is not None and per_token else None,
            responses=evaluator.responses or None,
            output_probs=None if probs is None else probs[1:],
            input_tokens=list(inp.values),
            output_tokens=self._labels(inp, response),
            inp=inp if isinstance(inp, ImageMaskInput) else None,
            target_ids=response.ids,
            response_text=response.text,
            output_audio=response.audio,
            provenance={
                **provenance(self, inp, per_step, kwargs, store, gen_args),
                "memory_halvings": sum(e.n_halvings for e in evaluators),
            },
            n_model_calls=self.adapter.thread_forward_calls()
            - calls_before
            + extra_calls
            + sum(game.stock_calls or []),
            n_coalitions=requested if ours else sum(e.n_requested for e in evaluators),
            n_unique_coalitions=sum(e.n_evaluated for e in evaluators),
            n_stored_coalitions=sum(e.n_stored for e in evaluators),
            wall_time=time.perf_counter() - start,
        )

    def _full_probs(self, game: ValueGame, evaluator: CoalitionEvaluator, n: int) -> Tensor | None:
        """The answer's probability under the whole input, then each of its
        tokens', ``(1 + T,)``, for the log-prob target (None for others): read
        from the full coalition's value, which a method has mostly evaluated
        already, else scored once more."""
        if not isinstance(self.value_fn, LogProbTarget) or game.columns != "tokens":
            return None
        key = coalition_key(torch.ones(n))
        stored = evaluator.store.get_many([key]).get(key)
        if stored is not None:
            values = torch.tensor(np.asarray(stored[0], dtype=np.float32)).reshape(-1)
        else:
            values = game.evaluate(torch.ones(1, n)).values[0].detach().float().cpu()
        return values if self.value_fn.kind == "prob" else values.exp()

    def _mean_stderr(self, errors: list[Tensor]) -> Tensor:
        """The standard error of the mean over trials: independent trials' errors
        add in quadrature; a posterior's (trials on nearly the same coalitions)
        are averaged, a bound whatever the trials' correlation."""
        stack = torch.stack(errors)
        if getattr(self.attr_method, "stderr_over_seeds", True):
            return stack.pow(2).sum(0).sqrt() / len(errors)
        return stack.mean(0)

    @staticmethod
    def _evaluate_call(perturbed_tensor: Tensor, call: MethodCall) -> Tensor:
        return call.columns(call.evaluator(perturbed_tensor))

    # The response explained --------------------------------------------------------------

    def _response(
        self,
        inp: InterpretableInput,
        target: str | Tensor | None,
        gen_args: dict[str, Any] | None,
        keep_eos: bool,
    ) -> tuple[Response, int]:
        """The response, and the model calls made outside the adapter to get it."""
        own = self.value_fn.gen_args  # a regenerating target's: its answers' settings
        if own and gen_args and any(own.get(k, _UNSET) != v for k, v in gen_args.items()):
            raise InvalidOptionError(  # the answer and the coalitions' answers would differ
                f"gen_args {gen_args} differ from the target's {own}, with which it regenerates "
                "every coalition's answer; give them once, to the target (e.g. "
                "EmbeddingSimilarity(gen_args=...))"
            )
        default = own or captum_compat.DEFAULT_GEN_ARGS
        stock = (
            None if isinstance(inp, ChatInput) else functools.partial(captum_compat.generate, self)
        )
        return resolve_response(self.adapter, inp, target, gen_args, keep_eos, default, stock)

    def _labels(self, inp: InterpretableInput, response: Response) -> list[str]:
        if isinstance(inp, ChatInput):
            return list(response.labels)
        return captum_compat.pretty_tokens(response.ids, self.tokenizer)  # stock Captum's labels


#: An answer probability below this (float32's smallest normal number) warns.
PROB_UNDERFLOW = float(torch.finfo(torch.float32).tiny)

_UNSET = object()


def _warn_on_underflow(total: float, length: int) -> None:
    """Warn when the whole answer's probability (``attr_target="prob"``) is too
    small for float32: every coalition's is then about 0, and so is ``seq_attr``."""
    if total < PROB_UNDERFLOW:
        warn_caller(
            f"the {length}-token answer's probability under the whole input is "
            f"{total:.1e}, below float32's normal range: seq_attr is about 0 "
            "whatever the features do; use attr_target='log_prob' (token_attr, one "
            "token's probability each, is not affected)"
        )
