"""A data set's chats and the tables an :func:`~captum_mllm.distributed.explain_dataset`
run writes: its chats named and checked as folders, a table's rows read as
requests (with their own columns of plain values, a label), and the summary,
per-feature table and index page of a run's folder."""

from __future__ import annotations

import tempfile
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from captum_mllm.chat_explainer import CHAT_KEYS, REPORT, RESULT, SUMMARY_COLUMNS
from captum_mllm.errors import InconsistentVersionWarning, InvalidOptionError
from captum_mllm.result import MultimodalLLMAttributionResult

INDEX = "index.html"
SUMMARY = "summary.csv"
ATTRIBUTIONS = "attributions.csv"


def named_chats(chats: Sequence[Any] | Mapping[str, Any] | pd.DataFrame) -> list[tuple[str, Any]]:
    """``(name, chat)`` of each chat of a data set (see
    :func:`~captum_mllm.distributed.explain_dataset`'s ``chats``), each name
    checked as a folder under the run's folder."""
    if isinstance(chats, pd.DataFrame):  # its rows (iterated, it gives its column names)
        chats = [table_row(row) for row in chats.to_dict("records")]
    elif _is_dataset(chats):
        chats = [table_row(row) for row in cast(Any, chats)]
    elif isinstance(chats, Mapping) and any(map(_is_dataset, chats.values())):
        split = next(iter(chats))  # a DatasetDict: each split was read as one chat
        raise InvalidOptionError(
            f"chats holds data sets ({', '.join(map(str, chats))}), not chats: give one "
            f"of them, e.g. chats[{split!r}]"
        )
    if isinstance(chats, Mapping):
        items = [(str(k), v) for k, v in chats.items()]
    else:  # a row's "id" (a data set's id column) names it, as on the command line
        items = []
        for i, chat in enumerate(chats):
            name = f"chat_{i:05d}"
            if isinstance(chat, Mapping) and "id" in chat:
                name = name if chat["id"] is None else str(chat["id"])  # None: Arrow's fill
                chat = {k: v for k, v in chat.items() if k != "id"}
            items.append((name, chat))
    names = [n for n, _ in items]
    twice = sorted(n for n, count in Counter(names).items() if count > 1)
    if twice:
        raise InvalidOptionError(f"chat names must be unique: {twice} name several chats")
    for name in names:  # each names a folder under store_dir, and nothing outside it
        if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise InvalidOptionError(
                f"chat name {name!r} cannot name a folder under store_dir: give names "
                "without '/', '\\' or NUL, other than '', '.' and '..'"
            )
        if name.casefold() in (SUMMARY, INDEX, ATTRIBUTIONS):  # the data set's own files
            raise InvalidOptionError(f"chat name {name!r} names a file explain_dataset writes")
    return items


#: Keys of a chat request that set generation (OpenAI's, vLLM's, transformers'):
#: they warn as not read, never become summary columns.
GENERATION_KEYS = frozenset(
    (
        "model", "temperature", "top_p", "top_k", "min_p", "max_tokens",
        "max_completion_tokens", "max_new_tokens", "n", "stop", "seed", "do_sample",
        "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
        "response_format", "tool_choice", "reasoning_effort",
    )
)  # fmt: skip


def data_columns(chat: Any) -> dict[str, Any]:
    """A chat request's other keys that hold plain values (a data set's label,
    category, source), for its row of the summary; none of the summary's own."""
    if not isinstance(chat, Mapping):
        return {}
    return {
        k: v
        for k, v in chat.items()
        if k not in CHAT_KEYS
        and k not in GENERATION_KEYS
        and k not in SUMMARY_COLUMNS
        and k != "conversations"
        and (v is None or isinstance(v, str | int | float | bool | np.generic))
    }


def _is_dataset(value: Any) -> bool:
    """Whether ``value`` is a table of chats: a ``datasets.Dataset`` or a DataFrame."""
    return isinstance(value, pd.DataFrame) or (
        hasattr(value, "column_names") and hasattr(value, "features")
    )


def table_row(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A table's row (a ``datasets.Dataset``'s, a pandas DataFrame's, a Parquet
    file's) as the request it holds: without the None (Arrow) or NaN (pandas)
    a table fills in for a key the row lacks, also inside its ``tools``,
    ``chat_template_kwargs`` and ``input_kwargs`` (a template reads
    ``date_string=None`` as the date "None"), and with lists where pandas holds
    NumPy arrays of objects (a clip's samples stay an array)."""

    def listed(value: Any) -> Any:
        if isinstance(value, np.ndarray) and value.dtype != object:
            return value  # a clip's samples: the audio reader takes an array as it is
        if isinstance(value, list) and not any(
            isinstance(v, list | dict | np.ndarray) for v in value[:1]
        ):
            return value  # of plain values (samples): nothing inside to convert
        if isinstance(value, np.ndarray | list):
            return [listed(v) for v in value]
        if isinstance(value, dict):
            return {k: listed(v) for k, v in value.items()}
        return value

    def unfilled(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: unfilled(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [unfilled(v) for v in value]
        return value

    missing = pd.api.types.is_scalar  # and NaN or None: the table's fill
    out = {str(k): listed(v) for k, v in row.items() if not (missing(v) and pd.isna(v))}
    return {k: unfilled(v) if k in CHAT_KEYS and k != "messages" else v for k, v in out.items()}


def check_folders_differ(names: list[str], root: Path) -> None:
    """On a file system that ignores case (macOS's and Windows' by default),
    chats named ``A1`` and ``a1`` would share one folder: each overwrote the
    other's result, and a rerun read one's result as the other's."""
    folded: dict[str, list[str]] = {}
    for name in names:
        folded.setdefault(name.casefold(), []).append(name)
    clashes = [group for group in folded.values() if len(group) > 1]
    if clashes and _ignores_case(root):
        raise InvalidOptionError(
            f"chat names {clashes} differ only in case, and the file system of {root} "
            "ignores case: their folders would be one; rename them"
        )


def _ignores_case(folder: Path) -> bool:
    """Whether ``folder``'s file system finds a file under its name in other case."""
    with tempfile.NamedTemporaryFile(dir=folder, prefix="case-probe-") as probe:
        return Path(probe.name).with_name(Path(probe.name).name.upper()).exists()


def dataset_attributions(
    store_dir: str | PathLike[str], chats: Sequence[str] | None = None
) -> pd.DataFrame:
    """Every explained chat's features in one table, a row per chat and
    feature (:meth:`MultimodalLLMAttributionResult.to_dataframe` without the
    output tokens' columns, which differ from chat to chat), for questions
    about a whole data set: ``table.groupby("modality")["seq_attr"].sum()``.
    :func:`explain_dataset` writes it as ``attributions.csv``.

    Args:
        store_dir (str or Path): an :func:`explain_dataset` run's folder.
        chats (sequence of str, optional): the chats to read, in order. Default:
            the chats of its ``summary.csv``, or (a run stopped before writing
            it) every chat folder holding a result, by name

    Returns:
        pandas.DataFrame: ``chat``, the data set's own columns of its
        ``summary.csv`` (a label, to group by), ``feature_index``, then the
        features' columns (``feature``, ``modality``, ``turn``, ``role``,
        ``start_s``, ``end_s``, ``seq_attr``, and ``seq_attr_stderr`` where
        sampled). A chat without a result (one that raised) has no rows.

    Examples::

        >>> table = dataset_attributions("runs/study")
        >>> table.groupby(["chat", "modality"])["seq_attr"].sum().unstack()
        >>> table.groupby(["label", "feature"])["seq_attr"].mean()  # a labelled data set
    """
    root = Path(store_dir)
    summary = _read_summary(root / SUMMARY)
    if chats is None and summary is not None:
        chats = list(summary["chat"])
    elif chats is None:  # a run stopped before its summary: the results it wrote
        chats = sorted(path.parent.name for path in root.glob(f"*/{RESULT}"))
    own = [] if summary is None else [c for c in summary if c not in SUMMARY_COLUMNS]
    rows = {} if summary is None else summary.set_index("chat")[own].to_dict("index")
    frames = []
    for name in chats:
        if (root / name / RESULT).is_file():
            with warnings.catch_warnings():  # one a chat after an upgrade; values stand
                warnings.simplefilter("ignore", InconsistentVersionWarning)
                res = MultimodalLLMAttributionResult.load(root / name / RESULT)
            frame = res.to_dataframe(per_token=False)
            data = {  # the feature's own columns win over the data set's
                k: v
                for k, v in rows.get(name, {}).items()
                if k not in frame and k != "feature_index"
            }
            frame = pd.concat(
                [pd.DataFrame({"chat": name, **data}, index=frame.index), frame], axis=1
            )
            frame.insert(1 + len(data), "feature_index", range(len(frame)))
            frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["chat", "feature_index", "feature", "seq_attr"])
    return pd.concat(frames, ignore_index=True)


def _read_summary(path: Path) -> pd.DataFrame | None:
    """An ``explain_dataset`` run's ``summary.csv``, its chat names as written
    ("007", "NA": names, not numbers or missing values); None when missing."""
    if not path.is_file():
        return None
    header = pd.read_csv(path, nrows=0).columns
    empty = {c: [""] for c in header if c != "chat"}  # a chat without a label: NaN
    return pd.read_csv(path, dtype={"chat": str}, keep_default_na=False, na_values=empty)


def write_index(root: Path, table: pd.DataFrame) -> None:
    """``index.html``: the summary, each chat's name a link to its ``report.html``."""
    from urllib.parse import quote

    from captum_mllm.viz.report import render_index

    links = {
        str(name): f"{quote(str(name))}/{REPORT}"
        for name in table.get("chat", [])
        if (root / str(name) / REPORT).is_file()
    }
    (root / INDEX).write_text(render_index(table, links), encoding="utf-8")
