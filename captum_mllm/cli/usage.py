"""What the command line accepts: its commands and flags, their types (checked
before a model loads), and its one-line error."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from captum_mllm.audio_units import ALIGNED_UNITS
from captum_mllm.errors import CaptumMLLMError
from captum_mllm.words import TEXT_UNITS

METHODS = ("exact", "bayes", "kernel", "permutation", "regression", "hierarchical", "captum-svs")
#: Tokens of a generated answer unless ``--max-new-tokens`` says.
MAX_NEW_TOKENS = 24
#: What runs a command: its parsed flags in, nothing out.
Command = Callable[[argparse.Namespace], None]


class UsageError(CaptumMLLMError):
    """A command-line mistake: reported in one line, exit code 2 (one of
    captum-mllm's errors, so a Ray worker's reaches the command line whole)."""


def audio_unit_value(text: str) -> Any:
    if text in ("frame", "turn", *ALIGNED_UNITS):
        return text
    try:
        return float(text)
    except ValueError:
        raise UsageError(
            f"--audio-unit must be frame, turn, word, sentence or seconds, got {text!r}"
        ) from None


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number is needed, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"a number above 0 is needed, got {text!r}")
    return value


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``, checked before
    a model loads (a 1.5B model takes a while to refuse ``--budget 0``)."""

    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a whole number is needed, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"at least {minimum} is needed, got {value}")
        return value

    return whole


def device_name(text: str) -> str:
    """An argparse type: a device torch knows (a typo was found only once the
    model had loaded, or the default model had been converted)."""
    import torch

    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"not a device: {text!r} (cpu, cuda, cuda:1, mps, ...)"
        ) from None
    return text


def json_object(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object (argparse turns the error into exit 2)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is needed, got {text!r}")
    return value


def build_parser(
    run_demo: Command, run_explain: Command, run_dataset: Command, run_report: Command
) -> argparse.ArgumentParser:
    """The commands and their flags; each command runs the function given for it."""
    parser = argparse.ArgumentParser(
        prog="captum-mllm",
        description="Shapley explanations of what (multimodal) chat models say, inside "
        "Captum. Each command has its own --help.",
    )
    from captum_mllm import __version__

    parser.add_argument("--version", action="version", version=f"captum-mllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="explain a factual question on the embedded SmolLM2")
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"))
    demo.add_argument(
        "--speech",
        action="store_true",
        help="explain a bundled spoken request on the trained demo speech model instead",
    )
    demo.set_defaults(run=run_demo)

    explain = sub.add_parser("explain", help="explain a chat with a model")
    explain.add_argument(
        "question", nargs="?",
        help="the user's question: the same as --user QUESTION (e.g. captum-mllm explain "
        "'Why is the sky blue?')",
    )  # fmt: skip
    explain.add_argument(
        "--chat", type=Path,
        help='a JSON or YAML Hugging Face message list, or an object {"messages": [...]}',
    )  # fmt: skip
    explain.add_argument("--system", help="system prompt (without --chat)")
    explain.add_argument("--user", action="append", default=[], help="a user turn (repeatable)")
    explain.add_argument(
        "--user-audio", action="append", default=[],
        help="audio of a user turn (repeatable: the i-th goes with the i-th --user)",
    )  # fmt: skip
    _model_flags(explain)
    explain.add_argument(
        "--transcript",
        action="append",
        default=[],
        help="what an audio clip says, for --audio-unit word or sentence (repeatable: one per "
        "clip, in the chat's order)",
    )
    explain.add_argument("--answer", help="the answer to explain (default: generate it)")
    explain.add_argument(
        "--foil",
        help="explain why the answer rather than this one: its log-probability less the "
        "foil's (attributions for and against the answer)",
    )
    explain.add_argument("--store", type=Path, help="SQLite coalition store (resumable runs)")
    explain.add_argument("--out", type=Path, default=Path("outputs/explain"))
    explain.set_defaults(run=run_explain)

    dataset = sub.add_parser(
        "explain-dataset", help="explain every chat of a data set (on Ray when installed)"
    )
    dataset.add_argument(
        "data",
        type=Path,
        help="a JSONL file of chats (message lists or {id, messages[, tools, "
        "chat_template_kwargs]}; ShareGPT's conversations too), a JSON file of a list of "
        "them (or of an object naming each), a Parquet file or Hugging Face datasets "
        "folder (a messages or conversations column, and those), or a folder of audio "
        "files with transcripts.csv (columns file, transcript[, text])",
    )
    _model_flags(dataset)
    dataset.add_argument("--workers", type=at_least(1), default=None, help="Ray actors")
    dataset.add_argument("--gpus-per-worker", type=float, default=None)
    dataset.add_argument("--cpus-per-worker", type=float, default=None)
    dataset.add_argument("--address", help="an existing Ray cluster ('auto', 'ray://host:10001')")
    dataset.add_argument("--no-ray", action="store_true", help="run in this process")
    dataset.add_argument(
        "--on-error",
        choices=("raise", "record"),
        default="raise",
        help="a chat that raises: stop (chats done are kept), or record the error in its "
        "row and go on",
    )
    dataset.add_argument("--out", type=Path, default=Path("outputs/dataset"))
    dataset.set_defaults(run=run_dataset)

    report = sub.add_parser("report", help="redraw a saved result")
    report.add_argument(
        "result", type=Path, help="the result.json written by explain or demo (or its folder)"
    )
    report.add_argument("--out", type=Path, default=None, help="default: beside the result")
    report.set_defaults(run=run_report)
    return parser


def _model_flags(parser: argparse.ArgumentParser) -> None:
    """The model, feature, method and target flags ``explain`` and ``explain-dataset`` share."""
    parser.add_argument(
        "--model",
        default="default",
        help="hub id, local folder, .gguf file, 'default' (SmolLM2), 'demo-speech' (the "
        "trained demo speech model) or a tiny test model",
    )
    parser.add_argument("--adapter", choices=("hf", "lfm2-audio"), help="default: guessed")
    parser.add_argument("--text-unit", default="word", choices=TEXT_UNITS)
    parser.add_argument(
        "--audio-unit", default="0.5", help="frame, turn, word, sentence, or seconds"
    )
    parser.add_argument(
        "--text-baseline", default="drop", choices=("drop", "replace"),
        help="an absent word is dropped from the chat, or replaced by a neutral token",
    )  # fmt: skip
    parser.add_argument(
        "--audio-baseline", default="drop", choices=("drop", "embedding", "silence"),
        help="an absent audio span is dropped, its encoding zeroed, or its samples silenced",
    )  # fmt: skip
    parser.add_argument(
        "--aligner",
        help="CTC model (hub id or folder) for --audio-unit word or sentence; 'demo': the demo's",
    )
    parser.add_argument(
        "--roles", default="user", help="comma-separated roles holding features (user,tool)"
    )
    parser.add_argument("--method", default="kernel", choices=METHODS)
    parser.add_argument(
        "--budget",
        type=at_least(1),
        help="coalition evaluations (default: 10 per feature; hierarchical: exact Owen "
        "values where they need at most 16,384, else 10 per feature sampled; exact "
        "evaluates all 2^n and refuses a smaller budget)",
    )
    parser.add_argument(
        "--target-stderr", type=positive_float, default=None,
        help="stop sampling once every feature's standard error is below this "
        "(--budget is then the cap); not for exact or captum-svs",
    )  # fmt: skip
    parser.add_argument("--target", default="log-prob", choices=("log-prob", "similarity"))
    parser.add_argument(
        "--max-new-tokens", type=at_least(1), default=None,
        help=f"length of a generated answer (default: {MAX_NEW_TOKENS})",
    )  # fmt: skip
    parser.add_argument(
        "--chat-template-kwargs", type=json_object, default=None,
        help='JSON keywords for the chat template, e.g. \'{"enable_thinking": false}\'',
    )  # fmt: skip
    parser.add_argument(
        "--device", type=device_name, default=None,
        help="cpu, cuda, cuda:1, mps, ... (default: the first GPU when there is one)",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", default=None, choices=("float32", "bfloat16", "float16"),
        help="default: float32 on a CPU, the checkpoint's (LFM2-Audio: bfloat16) on a GPU",
    )  # fmt: skip
    parser.add_argument("--seed", type=at_least(0), default=0)
    parser.add_argument(
        "--batch",
        type=at_least(1),
        default=None,
        help="coalitions per call (default: 64 on a CPU, 1024 on a GPU)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run Python code shipped with a hub checkpoint (off unless given)",
    )
