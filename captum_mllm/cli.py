"""The ``captum-mllm`` command (also ``python -m captum_mllm``).

- ``demo``: explain a factual question on the embedded SmolLM2 (offline).
- ``explain``: explain a chat from a JSON / YAML message list or from flags.
- ``report``: redraw a saved result.

Bad arguments, unreadable files or an unknown model exit with code 2 and one
line on stderr saying what was wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from captum_mllm.errors import CaptumMLLMError

DEMO_SYSTEM = "You are a geography expert."
DEMO_QUESTION = "What is the capital city of Japan?"
METHODS = ("exact", "kernel", "permutation", "regression", "hierarchical", "captum-svs")
TINY_MODELS = ("tiny-llama", "tiny-lfm2-audio")


class UsageError(Exception):
    """A command-line mistake: reported in one line, exit code 2."""


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``captum-mllm`` command."""
    parser = _parser()
    args = parser.parse_args(argv)  # argparse itself exits with 2 on bad flags
    try:
        args.run(args)
    except (UsageError, CaptumMLLMError, OSError) as exc:
        print(f"captum-mllm: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captum-mllm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="explain a factual question on the embedded SmolLM2")
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"))
    demo.set_defaults(run=_demo)

    explain = sub.add_parser("explain", help="explain a chat with a model")
    explain.add_argument("--chat", type=Path, help="a JSON or YAML Hugging Face message list")
    explain.add_argument("--system", help="system prompt (without --chat)")
    explain.add_argument("--user", action="append", default=[], help="a user turn (repeatable)")
    explain.add_argument("--user-audio", action="append", default=[], help="audio of a user turn")
    explain.add_argument(
        "--model",
        default="default",
        help="hub id, local folder, .gguf file, 'default' (SmolLM2) or a tiny test model",
    )
    explain.add_argument("--adapter", choices=("hf", "lfm2-audio"), help="default: guessed")
    explain.add_argument("--text-unit", default="word", choices=("token", "word", "turn"))
    explain.add_argument("--audio-unit", default="0.5", help="frame, turn, word, or seconds")
    explain.add_argument("--roles", default="user", help="comma-separated roles holding features")
    explain.add_argument("--method", default="kernel", choices=METHODS)
    explain.add_argument(
        "--budget", type=int, help="coalition evaluations (default: 10 per feature)"
    )
    explain.add_argument("--target", default="log-prob", choices=("log-prob", "similarity"))
    explain.add_argument("--answer", help="the answer to explain (default: generate it)")
    explain.add_argument("--max-new-tokens", type=int, default=24)
    explain.add_argument("--device", default=None)
    explain.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    explain.add_argument("--seed", type=int, default=0)
    explain.add_argument("--store", type=Path, help="SQLite coalition store (resumable runs)")
    explain.add_argument("--batch", type=int, default=32, help="coalitions per forward")
    explain.add_argument("--out", type=Path, default=Path("outputs/explain"))
    explain.set_defaults(run=_explain_command)

    report = sub.add_parser("report", help="redraw a saved result")
    report.add_argument("result", type=Path, help="the .json written by explain or demo")
    report.add_argument("--out", type=Path, default=None, help="default: beside the result")
    report.set_defaults(run=_report)
    return parser


# Commands -----------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> None:
    from captum_mllm import Chat, load_default_model

    print("loading SmolLM2-135M-Instruct (converted once into the cache)...", flush=True)
    model = load_default_model()
    chat = Chat().system(DEMO_SYSTEM).user(DEMO_QUESTION)
    settings = {"method": "exact", "budget": None, "target": "log-prob", "seed": 0}
    _run(model, chat, settings, args.out, max_new_tokens=16)


def _explain_command(args: argparse.Namespace) -> None:
    from captum_mllm import Chat

    if args.chat is not None:
        if args.user or args.system or args.user_audio:
            raise UsageError("give the chat either as --chat FILE or as --system/--user flags")
        chat = Chat.from_messages(_read_messages(args.chat))
    else:
        if not args.user and not args.user_audio:
            raise UsageError("no chat: give --chat FILE or at least one --user")
        chat = Chat().system(args.system) if args.system else Chat()
        texts, clips = list(args.user), list(args.user_audio)
        for i in range(max(len(texts), len(clips))):
            chat = chat.user(texts[i] if i < len(texts) else None,
                             audio=clips[i] if i < len(clips) else None)  # fmt: skip
    model = _load_model(args.model, args.adapter, args.device, args.dtype)
    settings = {
        "method": args.method,
        "budget": args.budget,
        "target": args.target,
        "seed": args.seed,
        "answer": args.answer,
        "store": args.store,
        "batch": args.batch,
    }
    input_kwargs = {
        "text_unit": args.text_unit,
        "audio_unit": _audio_unit(args.audio_unit),
        "roles": tuple(r.strip() for r in args.roles.split(",")),
    }
    _run(model, chat, settings, args.out, args.max_new_tokens, input_kwargs)


def _report(args: argparse.Namespace) -> None:
    from captum_mllm import MultimodalLLMAttributionResult

    if not args.result.is_file():
        raise UsageError(f"no saved result at {args.result}")
    res = MultimodalLLMAttributionResult.load(args.result)
    out = args.out or args.result.parent
    _print(res)
    _write(res, out, save=False)


# Shared steps -------------------------------------------------------------------------


def _run(
    model: Any,
    chat: Any,
    settings: dict[str, Any],
    out: Path,
    max_new_tokens: int,
    input_kwargs: dict[str, Any] | None = None,
) -> None:
    import torch

    from captum_mllm import ChatInput, EmbeddingSimilarity, MultimodalLLMAttribution

    torch.manual_seed(settings["seed"])
    inp = ChatInput(chat, model, **(input_kwargs or {}))
    gen = {"max_new_tokens": max_new_tokens}
    target = EmbeddingSimilarity(gen_args=gen) if settings["target"] == "similarity" else None
    method = _method(settings["method"], model)
    attr = MultimodalLLMAttribution(method, model, target=target)
    kwargs: dict[str, Any] = {"perturbations_per_eval": settings.get("batch", 32)}
    if settings["method"] == "captum-svs":
        kwargs["n_samples"] = max(
            1, (settings["budget"] or 10 * inp.n_itp_features) // inp.n_itp_features
        )
    elif settings["method"] in ("kernel", "permutation", "regression"):
        kwargs.update(budget=settings["budget"], seed=settings["seed"])
    kwargs["show_progress"] = True
    answer = settings.get("answer")
    if answer is None and inp.response is None and settings["target"] == "log-prob":
        kwargs["gen_args"] = gen
    print(f"{inp.n_itp_features} features: {', '.join(inp.values)}", flush=True)
    res = attr.attribute(inp, target=answer, store=settings.get("store"), **kwargs)
    _print(res)
    _write(res, out, save=True)


def _method(name: str, model: Any) -> Any:
    from captum.attr import ShapleyValueSampling

    from captum_mllm import methods

    return {
        "exact": methods.ExactShapleyValues,
        "kernel": methods.LeverageKernelShap,
        "permutation": methods.PairedPermutationSampling,
        "regression": methods.RegressionAdjustedShapley,
        "hierarchical": methods.HierarchicalShapley,
        "captum-svs": ShapleyValueSampling,
    }[name](model)


def _print(res: Any) -> None:
    print(f"answer: {res.response_text!r}")
    table = res.to_dataframe()
    columns = [c for c in ("feature", "modality", "turn", "role", "seq_attr") if c in table]
    ranked = table[columns].sort_values("seq_attr", ascending=False)
    print(ranked.to_string(index=False))
    print(res)


def _write(res: Any, out: Path, save: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    written = ["seq_attr.png", "attributions.csv"]
    res.plot_seq_attr()[0].savefig(out / "seq_attr.png", bbox_inches="tight")
    if res.token_attr is not None:
        res.plot_token_attr()[0].savefig(out / "token_attr.png", bbox_inches="tight")
        written.append("token_attr.png")
    res.to_dataframe().to_csv(out / "attributions.csv", index=False)
    res.save_html(out / "report.html")
    written.append("report.html")
    if save:
        res.save(out / "result.json")
        written.append("result.json")
    print(f"wrote {', '.join(str(out / w) for w in written)}")


def _read_messages(path: Path) -> list[dict[str, Any]]:
    """A Hugging Face message list from JSON or YAML; audio paths are relative to the file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            messages = yaml.safe_load(text)
        else:
            messages = json.loads(text)
    except Exception as exc:  # the parsers raise several types
        raise UsageError(
            f"{path} is not valid {path.suffix[1:].upper() or 'JSON'}: {exc}"
        ) from None
    if not isinstance(messages, list):
        raise UsageError(f"{path} must hold a list of messages")
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for item in content if isinstance(content, list) else []:
            for key in ("audio", "path"):
                value = item.get(key) if isinstance(item, dict) else None
                if isinstance(value, str) and not Path(value).is_absolute():
                    item[key] = str(path.parent / value)
    return messages


def _audio_unit(text: str) -> Any:
    if text in ("frame", "turn", "word"):
        return text
    try:
        return float(text)
    except ValueError:
        raise UsageError(
            f"--audio-unit must be frame, turn, word or seconds, got {text!r}"
        ) from None


def _load_model(name: str, adapter: str | None, device: str | None, dtype: str | None) -> Any:
    import torch

    from captum_mllm import HFCausalLMAdapter, LFM2AudioAdapter, load_default_model

    torch_dtype = getattr(torch, dtype) if dtype else None
    if name == "default":
        return load_default_model(device=device, dtype=torch_dtype)
    if name in TINY_MODELS:
        from captum_mllm import testing

        if name == "tiny-llama":
            return testing.tiny_hf_adapter()
        return LFM2AudioAdapter(*testing.tiny_lfm2_audio())
    path = Path(name)
    kind = adapter or _guess_adapter(name)
    try:
        if path.suffix == ".gguf":
            if not path.is_file():
                raise UsageError(f"no GGUF file at {path}")
            return HFCausalLMAdapter.from_pretrained(
                str(path.parent), gguf_file=path.name, device=device, dtype=torch_dtype
            )
        if kind == "lfm2-audio":
            return LFM2AudioAdapter.from_pretrained(name, device=device, dtype=torch_dtype)
        return HFCausalLMAdapter.from_pretrained(name, device=device, dtype=torch_dtype)
    except UsageError:
        raise
    except Exception as exc:  # hub and loading errors come in many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load model {name!r}: {first}") from None


def _guess_adapter(name: str) -> str:
    """``lfm2-audio`` for LFM2-Audio checkpoints (by name or config), else ``hf``."""
    config = Path(name) / "config.json"
    text = config.read_text().lower() if config.is_file() else name.lower()
    return "lfm2-audio" if "lfm2" in text and "audio" in text else "hf"


if __name__ == "__main__":
    main()
