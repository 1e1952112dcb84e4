"""The ``captum-mllm`` command (also ``python -m captum_mllm``).

- ``demo``: explain a factual question on the embedded SmolLM2 (offline);
  ``demo --speech``: a spoken request on the project's trained speech model.
- ``explain``: explain a chat from a JSON / YAML message list or from flags.
- ``explain-dataset``: explain every chat of a data set, over Ray workers
  when Ray is installed (resumable: rerun with the same ``--out``).
- ``report``: redraw a saved result.

Bad arguments, unreadable files or an unknown model exit with code 2 and one
line on stderr saying what was wrong.
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from captum_mllm.audio_units import ALIGNED_UNITS
from captum_mllm.cli.files import read_dataset, read_messages
from captum_mllm.cli.models import model_factory
from captum_mllm.cli.usage import MAX_NEW_TOKENS, UsageError, audio_unit_value, build_parser
from captum_mllm.errors import CaptumMLLMError

DEMO_SYSTEM = "You are a geography expert."
DEMO_QUESTION = "What is the capital city of Japan?"


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``captum-mllm`` command."""
    for stream in (sys.stdout, sys.stderr):  # a console or file that is not UTF-8 (Windows'
        if hasattr(stream, "reconfigure"):  # cp1252): write \u6771 rather than raise
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser(_demo, _explain_command, _dataset_command, _report)
    args = parser.parse_args(argv)  # argparse itself exits with 2 on bad flags
    formatwarning = warnings.formatwarning
    warnings.formatwarning = _format_warning
    try:
        args.run(args)
    except (CaptumMLLMError, OSError) as exc:  # UsageError is one of ours
        notes = "".join(f" ({note})" for note in getattr(exc, "__notes__", ()))
        print(f"captum-mllm: error: {exc}{notes}", file=sys.stderr)  # notes: which chat
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # Ctrl-C: what is kept, in a line rather than a traceback
        print(f"\ncaptum-mllm: interrupted{_resume_hint(args)}", file=sys.stderr)
        raise SystemExit(130) from None  # 128 + SIGINT, as shells report it
    finally:
        warnings.formatwarning = formatwarning


def _resume_hint(args: argparse.Namespace) -> str:
    """How an interrupted command picks up where it stopped."""
    if args.command == "explain-dataset":
        return (
            f"; run the same command again: the chats done are skipped, the others resume "
            f"from their stores under {args.out}"
        )
    if args.command != "explain":
        return ""
    if args.store is not None:
        return f"; run the same command again: it resumes from {args.store}"
    return "; with --store FILE a run keeps what it evaluated, and a rerun resumes from it"


def _format_warning(message: Any, category: type[Warning], *_: Any, **__: Any) -> str:
    """A warning as the command's own line: not the console script's path and
    its ``sys.exit(main())`` line, which the warning's origin shows otherwise."""
    from tqdm import tqdm

    kind = "warning" if category is UserWarning else category.__name__
    lead = "\n" if getattr(tqdm, "_instances", None) else ""  # after a bar's line, not on it
    return f"{lead}captum-mllm: {kind}: {message}\n"


def _demo(args: argparse.Namespace) -> None:
    from captum_mllm import Chat, load_default_model

    if args.speech:
        _speech_demo(args.out)
        return
    print("loading SmolLM2-135M-Instruct (converted once into the cache)...", flush=True)
    model = load_default_model()
    chat = Chat().system(DEMO_SYSTEM).user(DEMO_QUESTION)
    settings = {"method": "exact", "budget": None, "target": "log-prob", "seed": 0}
    _run(model, chat, settings, args.out, max_new_tokens=16)


def _speech_demo(out: Path) -> None:
    from captum_mllm import MultimodalLLMAttribution, demo
    from captum_mllm.methods import ExactShapleyValues

    model, aligner = demo.load()
    example = demo.examples()[0]
    print(f"spoken request: {example.transcript!r} (the right answer: {example.answer!r})")
    inp = demo.request_input(model, aligner, example.waveform, example.transcript)
    print(f"{inp.n_itp_features} features: {', '.join(inp.values)}", flush=True)
    attr = MultimodalLLMAttribution(ExactShapleyValues(model), model)
    res = attr.attribute(inp, gen_args={"max_new_tokens": 6}, show_progress=True)
    _print(res)
    _write(res, out, save=True)
    tops = zip(res.output_tokens, demo.top_words(res), example.deciding, strict=False)
    for label, top, word in tops:  # a wrong answer may be longer or shorter
        print(f"  answer token {label!r}: top feature {' '.join(top)!r} (deciding word: {word!r})")


def _explain_command(args: argparse.Namespace) -> None:
    from captum_mllm import Chat

    if args.question is not None:
        if args.user or args.chat is not None:
            raise UsageError("give the question once: as QUESTION, or as --user or --chat")
        args.user = [args.question]
    if args.chat is not None:
        if args.user or args.system or args.user_audio:
            raise UsageError("give the chat either as --chat FILE or as --system/--user flags")
        messages, template = read_messages(args.chat)
        chat = Chat.from_messages(messages)
        if template:  # its tools and chat_template_kwargs, for the chat template
            twice = sorted(set(template) & set(args.chat_template_kwargs or {}))
            if twice:
                raise UsageError(
                    f"{args.chat} holds {twice}, and --chat-template-kwargs too: give them once"
                )
            args.chat_template_kwargs = {**(args.chat_template_kwargs or {}), **template}
    else:
        if not args.user and not args.user_audio:
            raise UsageError("no chat: give --chat FILE or at least one --user")
        chat = Chat().system(args.system) if args.system else Chat()
        texts, clips = list(args.user), list(args.user_audio)
        for i in range(max(len(texts), len(clips))):
            chat = chat.user(texts[i] if i < len(texts) else None,
                             audio=clips[i] if i < len(clips) else None)  # fmt: skip
    answer = args.answer
    if answer is not None and chat.split_response()[1] is None:
        # The chat's final turn, so the answer follows what the template puts before it
        chat, answer = chat.assistant(answer), None
    answered = args.answer is not None or chat.split_response()[1] is not None
    if args.foil is not None and args.target != "log-prob":
        raise UsageError(f"--foil weighs log-probabilities: --target {args.target} has none")
    if answered and args.max_new_tokens is not None and args.target == "log-prob":
        raise UsageError("--max-new-tokens is unused: the answer to explain is given")
    if audio_unit_value(args.audio_unit) in ALIGNED_UNITS and not args.transcript:
        raise UsageError(
            f"--audio-unit {args.audio_unit} needs a --transcript for each clip, and --aligner"
        )
    input_kwargs = _input_kwargs(args)
    if args.transcript:
        input_kwargs["transcripts"] = list(args.transcript)
    settings = {**_settings(args), "answer": answer, "foil": args.foil, "store": args.store}
    model = model_factory(args)()
    _run(model, chat, settings, args.out, _max_new_tokens(args), input_kwargs)


def _dataset_command(args: argparse.Namespace) -> None:
    from functools import partial

    from captum_mllm.distributed import explain_dataset

    input_kwargs = _input_kwargs(args)
    chats = read_dataset(args.data, transcripts=input_kwargs["audio_unit"] in ALIGNED_UNITS)
    gen = {"max_new_tokens": _max_new_tokens(args)}
    settings = _settings(args)
    resources: dict[str, float] = {}
    if args.gpus_per_worker is not None:
        resources["num_gpus"] = args.gpus_per_worker
    if args.cpus_per_worker is not None:
        resources["num_cpus"] = args.cpus_per_worker
    print(f"{len(chats)} chats from {args.data}", flush=True)
    table = explain_dataset(
        chats,
        model_factory(args),
        partial(_method, args.method),
        input_kwargs,
        {**_method_kwargs(settings, None), "gen_args": gen, **_batch(settings)},
        store_dir=args.out,
        num_workers=args.workers,
        resources_per_worker=resources or None,
        target_factory=partial(_similarity, gen) if args.target == "similarity" else None,
        address=args.address,
        use_ray=False if args.no_ray else None,
        on_error=args.on_error,
    )
    _print_table(table)
    print(
        f"wrote {args.out / 'summary.csv'}, {args.out / 'attributions.csv'} (every chat's "
        f"features), {args.out / 'index.html'} (open it to read the chats' pages) and one "
        f"folder per chat under {args.out} (its result.json and report.html)"
    )


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The method, target and batch flags ``explain`` and ``explain-dataset``
    share, checked before a model loads."""
    if args.target_stderr is not None and args.method in ("exact", "captum-svs"):
        why = "is exact" if args.method == "exact" else "reports no standard errors"
        raise UsageError(f"--target-stderr stops a sampler early: --method {args.method} {why}")
    keys = ("method", "budget", "target_stderr", "target", "seed", "batch")
    return {k: getattr(args, k) for k in keys}


def _max_new_tokens(args: argparse.Namespace) -> int:
    return MAX_NEW_TOKENS if args.max_new_tokens is None else int(args.max_new_tokens)


def _input_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """ChatInput's arguments from the feature flags ``explain`` and ``explain-dataset`` share."""
    kwargs = {
        "text_unit": args.text_unit,
        "text_baseline": args.text_baseline,
        "audio_unit": audio_unit_value(args.audio_unit),
        "audio_baseline": args.audio_baseline,
        "roles": tuple(r.strip() for r in args.roles.split(",")),
    }
    if kwargs["audio_unit"] in ALIGNED_UNITS and not args.aligner:
        raise UsageError(
            f"--audio-unit {kwargs['audio_unit']} needs --aligner (a CTC model, or 'demo')"
        )
    if args.aligner:
        kwargs["aligner"] = _aligner(args.aligner)
    return kwargs


def _similarity(gen: dict[str, Any]) -> Any:
    from captum_mllm import EmbeddingSimilarity

    return EmbeddingSimilarity(gen_args=gen)


def _aligner(name: str) -> Any:
    from captum_mllm.audio import ForcedAligner

    if name == "demo":
        from captum_mllm import demo

        return ForcedAligner(str(demo.WEIGHTS / "aligner"))
    return ForcedAligner(name)


def _report(args: argparse.Namespace) -> None:
    from captum_mllm import MultimodalLLMAttributionResult

    path = args.result
    if path.is_dir() and (path / "summary.csv").is_file():
        raise UsageError(
            f"{path} is an explain-dataset folder: its index.html links every chat's "
            f"report; give one chat's folder (e.g. {path / '<chat>'})"
        )
    if not path.exists():
        raise UsageError(f"no saved result at {path}")
    res = MultimodalLLMAttributionResult.load(path)  # a file, or the folder explain wrote
    out = args.out or (path if path.is_dir() else path.parent)
    _print(res)
    _write(res, out, save=False)


def _run(
    model: Any,
    chat: Any,
    settings: dict[str, Any],
    out: Path,
    max_new_tokens: int,
    input_kwargs: dict[str, Any] | None = None,
) -> None:
    import torch

    from captum_mllm import (
        ChatInput,
        ContrastiveTarget,
        EmbeddingSimilarity,
        MultimodalLLMAttribution,
        Target,
    )

    torch.manual_seed(settings["seed"])
    inp = ChatInput(chat, model, **(input_kwargs or {}))
    gen = {"max_new_tokens": max_new_tokens}
    target: Target | None = None
    if settings["target"] == "similarity":
        target = EmbeddingSimilarity(gen_args=gen)
    elif settings.get("foil") is not None:
        target = ContrastiveTarget(settings["foil"])
    method = _method(settings["method"], model)
    n = inp.n_itp_features
    if settings["method"] == "exact" and n > method.max_features:  # before the answer
        raise UsageError(
            f"--method exact evaluates all 2^n coalitions, and this chat has {n} features "
            f"(2^{n} = {2**n:,}; at most {method.max_features}): use --method bayes, kernel "
            "or hierarchical, which sample --budget of them"
        )
    attr = MultimodalLLMAttribution(method, model, target=target)
    kwargs: dict[str, Any] = _batch(settings)
    kwargs.update(_method_kwargs(settings, inp.n_itp_features), show_progress=True)
    answer = settings.get("answer")
    if answer is None and inp.response is None and settings["target"] == "log-prob":
        kwargs["gen_args"] = gen
    print(f"{inp.n_itp_features} features: {', '.join(inp.values)}", flush=True)
    res = attr.attribute(inp, target=answer, store=settings.get("store"), **kwargs)
    _print(res)
    _write(res, out, save=True)


def _batch(settings: dict[str, Any]) -> dict[str, Any]:
    """``perturbations_per_eval`` when ``--batch`` was given, else nothing (the
    library's default for the device)."""
    batch = settings.get("batch")
    return {} if batch is None else {"perturbations_per_eval": batch}


def _method_kwargs(settings: dict[str, Any], n_features: int | None) -> dict[str, Any]:
    """The method's budget arguments (Captum's sampler counts permutations)."""
    method, budget = settings["method"], settings["budget"]
    stderr = settings.get("target_stderr")
    if method == "exact":  # a --budget below 2^n is refused, not overrun
        return {} if budget is None else {"budget": budget}
    if method == "captum-svs":  # seeded as ours are: a chat's draws do not hang on the one before
        if budget is None:
            return {"n_samples": 10, "seed": settings["seed"]}
        if n_features is None:  # explain-dataset: one setting for chats of any length
            raise UsageError(
                "--method captum-svs counts permutations of each chat's features, so "
                "explain-dataset cannot turn --budget into them: leave --budget out (10 "
                "permutations) or use --method permutation"
            )
        return {"n_samples": max(1, budget // n_features), "seed": settings["seed"]}
    kwargs = {"budget": budget, "seed": settings["seed"]}
    return kwargs if stderr is None else {**kwargs, "target_stderr": stderr}


def _method(name: str, model: Any) -> Any:
    from captum.attr import ShapleyValueSampling

    from captum_mllm import methods
    from captum_mllm.methods.hierarchical import EXACT_WARNING

    if name == "hierarchical":  # exact Owen values of a long chat take hours: sample them
        return methods.HierarchicalShapley(model, exact_limit=EXACT_WARNING)
    return {
        "bayes": methods.BayesianShapley,
        "exact": methods.ExactShapleyValues,
        "kernel": methods.LeverageKernelShap,
        "permutation": methods.PairedPermutationSampling,
        "regression": methods.RegressionAdjustedShapley,
        "captum-svs": ShapleyValueSampling,
    }[name](model)


def _print(res: Any) -> None:
    rather = "" if res.foil is None else f", rather than {res.foil!r}"
    print(f"answer: {res.response_text!r}{rather}")
    table = res.to_dataframe()
    columns = [c for c in ("feature", "modality", "turn", "role", "seq_attr") if c in table]
    ranked = table[columns].sort_values("seq_attr", ascending=False)
    _print_table(ranked)
    print(res)


def _print_table(table: Any) -> None:
    """A table as a terminal shows it: a Chinese character takes two columns
    (pandas counts one unless told, and the columns went out of line)."""
    import pandas as pd

    with pd.option_context("display.unicode.east_asian_width", True):
        print(table.to_string(index=False))


def _write(res: Any, out: Path, save: bool) -> None:
    import matplotlib
    import matplotlib.pyplot as plt

    from captum_mllm.saved_results import RESULT_FILE
    from captum_mllm.viz.fonts import glyph_warnings_muted

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Callable[[], Any]] = {"seq_attr.png": res.plot_seq_attr}
    if res.token_attr is not None:
        figures["token_attr.png"] = res.plot_token_attr
    if res.segments:  # the whole chat, coloured: a Captum input has none
        figures["chat_attr.png"] = res.plot_chat_attr
    for k in range(len(res.clips or [])):  # every clip, not the first alone
        name = "audio_attr.png" if k == 0 else f"audio_attr_clip{k}.png"
        figures[name] = functools.partial(res.plot_audio_attr, clip=k)
    for name, plot in figures.items():
        fig = plot()[0]
        with glyph_warnings_muted():  # the plot named those characters once
            fig.savefig(out / name, bbox_inches="tight")
        plt.close(fig)
    written = [*figures, "attributions.csv", "report.html"]
    res.to_dataframe().to_csv(out / "attributions.csv", index=False)
    res.save_html(out / "report.html")
    if save:
        res.save(out / RESULT_FILE)  # the file load() finds in a folder
        written.append(RESULT_FILE)
    print(f"wrote {', '.join(str(out / w) for w in written)}")


if __name__ == "__main__":
    main()
