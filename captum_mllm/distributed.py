"""Explaining many chats, or one very large explanation, over many workers (Ray).

Each worker is a Ray actor holding one model replica (a GPU each by default);
each task explains one chat and saves its result and its coalition store under
``store_dir`` as it finishes, so a rerun skips finished chats and resumes
unfinished ones, and a chat whose worker died is retried on a fresh one
without losing what was evaluated. Without Ray the same calls run in-process.
``store_dir`` must be reachable by every worker (a shared filesystem on a
cluster).

Examples::

    >>> from captum_mllm.distributed import explain_dataset
    >>> table = explain_dataset(
    ...     chats, lambda: LFM2AudioAdapter.from_pretrained("LiquidAI/LFM2-Audio-1.5B"),
    ...     LeverageKernelShap, {"audio_unit": 0.5}, {"budget": 500},
    ...     store_dir="runs/study", num_workers=8)
"""

from __future__ import annotations

import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from captum_mllm.chat import request_template_kwargs
from captum_mllm.chat_explainer import (
    CHAT_KEYS,
    REPORT,
    RESULT,
    SUMMARY_COLUMNS,
    ChatExplainer,
    MethodFactory,
    ModelFactory,
    chat_of,
    shard_file,
    summary_row,
)
from captum_mllm.coalitions import SQLiteStore
from captum_mllm.errors import (
    InconsistentVersionWarning,
    InvalidOptionError,
    ResultFormatError,
    require_int,
    warn_caller,
)
from captum_mllm.fingerprint import chat_digest, digest, plain
from captum_mllm.ray_pool import chats_on_ray, shards_on_ray, start_ray
from captum_mllm.result import MultimodalLLMAttributionResult

INDEX = "index.html"
SUMMARY = "summary.csv"
ATTRIBUTIONS = "attributions.csv"

__all__ = ["explain_dataset", "explain_sharded", "ChatExplainer"]


#: What :func:`explain_dataset` does with a chat that raises.
ON_ERROR = ("raise", "record")


def _named(chats: Sequence[Any] | Mapping[str, Any] | pd.DataFrame) -> list[tuple[str, Any]]:
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


def _data_columns(chat: Any) -> dict[str, Any]:
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


def _check_folders_differ(names: list[str], root: Path) -> None:
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


def _check_ray_settings(use_ray: bool | None, **settings: Any) -> None:
    """Ray's own settings with ``use_ray=False`` would go unread: refuse them."""
    given = sorted(k for k, v in settings.items() if v is not None)
    if use_ray is False and given:
        raise InvalidOptionError(
            f"{', '.join(given)} are Ray's settings, unread with use_ray=False"
        )


def _check_attribute_kwargs(attribute_kwargs: dict[str, Any] | None) -> None:
    """``store`` and ``shard`` are set per chat here: given too, a TypeError came
    from inside a worker."""
    own = sorted({"store", "shard"} & set(attribute_kwargs or {}))
    if own:
        raise InvalidOptionError(
            f"attribute_kwargs {own} are set here (each chat's store under store_dir, or "
            "explain_sharded's store= and num_shards=); leave them out"
        )


def explain_dataset(
    chats: Sequence[Any] | Mapping[str, Any],
    model_factory: ModelFactory,
    method_factory: MethodFactory,
    input_kwargs: dict[str, Any] | None = None,
    attribute_kwargs: dict[str, Any] | None = None,
    *,
    store_dir: str | Path,
    num_workers: int | None = None,
    resources_per_worker: dict[str, float] | None = None,
    target_factory: Callable[[], Any] | None = None,
    address: str | None = None,
    max_retries: int = 3,
    use_ray: bool | None = None,
    show_progress: bool = True,
    on_worker_start: Callable[[list[Any]], None] | None = None,
    on_error: str = "raise",
) -> pd.DataFrame:
    """Explain every chat of a data set, one chat per task, over Ray actors.

    Each chat's result (``result.json``, see
    :meth:`MultimodalLLMAttributionResult.save`), its page
    (``report.html``, :meth:`~MultimodalLLMAttributionResult.save_html`) and
    coalition store (``coalitions.sqlite``) go to ``store_dir/<chat name>/``
    as soon as it is done. A rerun skips a chat whose result answers the same request: the
    same chat, ``input_kwargs`` and ``attribute_kwargs``, and factories of
    the same names, constants and closure values (a lambda's checkpoint
    name). A changed request explains the chat again, reading what its store
    holds when the values still apply (another budget or method); a store of
    another chat, model or target raises
    :class:`~captum_mllm.errors.StoreMismatchError`. A chat whose store exists
    resumes from it. When a worker dies (killed, out of memory) its chat is
    retried on a fresh worker, up to ``max_retries`` times.

    Args:
        chats (sequence, mapping or pandas.DataFrame): ``Chat`` objects, Hugging Face message
            lists, or requests ``{"messages": [...], ...}`` (or ShareGPT's
            ``{"conversations": [...]}``) that may add
            ``"tools"`` (an OpenAI request's) and ``"chat_template_kwargs"``
            (vLLM's) for the chat template, and ``"input_kwargs"``: the chat's
            own ``ChatInput`` arguments (e.g. its ``transcripts``); its other
            keys of plain values (a data set's label, category) become columns
            of the summary, after ``chat``, and the rest warn (generation
            settings such as ``temperature``, lists, a summary column's name).
            A mapping names them, else a request's ``"id"`` (a data set's id
            column) or its place: ``chat_00000``, ... A data frame (or a
            ``datasets.Dataset``) gives a request a row, from its columns.
        model_factory (callable): ``() -> ModelAdapter``: builds one replica per
            worker (it is sent to the workers, so it must be picklable by
            cloudpickle: a function or lambda, not a loaded model).
        method_factory (callable): ``adapter -> method``, e.g. ``LeverageKernelShap``.
        input_kwargs (dict, optional): ``ChatInput`` arguments.
        attribute_kwargs (dict, optional): ``attribute`` arguments (``budget``, ...);
            ``gen_args`` reaches only the chats without a final assistant turn
            (a chat that holds its answer explains that answer).
        store_dir (str or Path): where results and stores go, a folder per chat
            (``result.json``, ``report.html``), with the returned table in
            ``summary.csv`` and ``index.html`` (each chat linking to its page).
        num_workers (int, optional): actors; those the cluster has no room for
            start as others run out of chats. Default: one per GPU Ray sees, else 1
        resources_per_worker (dict, optional): Ray resources of an actor, e.g.
            ``{"num_gpus": 0.5}`` or ``{"num_cpus": 2}``; more than the cluster
            holds raises :class:`~captum_mllm.errors.InvalidOptionError` (warns on
            a cluster joined at ``address``, which an autoscaler may grow). Default:
            one GPU when Ray sees GPUs, else one CPU
        target_factory (callable, optional): ``() -> Target``. Default: log-probability
        address (str, optional): an existing Ray cluster (``"auto"`` or
            ``"ray://host:10001"``). Default: a local one
        max_retries (int, optional): retries of a chat whose worker died. Default: 3
        use_ray (bool, optional): False runs in-process; None uses Ray when
            installed. Default: None
        show_progress (bool, optional): a progress bar over finished chats. Default: True
        on_worker_start (callable, optional): called with the actor handles once
            they exist (tests use it to kill one). Default: None
        on_error (str, optional): ``"raise"`` stops at the first chat that
            raises (the chats done so far are kept: a rerun skips them);
            ``"record"`` puts ``"ErrorType: message"`` in that chat's ``error``
            column and goes on, with a warning naming how many failed (a rerun
            tries them again); so too a chat whose worker died more than
            ``max_retries`` times. Default: "raise"

    Returns:
        pandas.DataFrame: one row per chat (name, response, number of features,
        top feature, coalitions evaluated and read from the store, seconds,
        ``"skipped"`` for chats already done: their row is their saved result's,
        ``"error"`` with ``on_error="record"``), with the data set's own columns
        after the name.

    Examples::

        >>> chats = {"capital": Chat().user("What is the capital of France?"),
        ...          "sky": [{"role": "user", "content": "Why is the sky blue?"}]}
        >>> table = explain_dataset(chats, load_default_model, LeverageKernelShap,
        ...                         attribute_kwargs={"budget": 120}, store_dir="runs/")
        >>> dataset_attributions("runs/").groupby("chat")["seq_attr"].describe()
    """
    root = Path(store_dir)
    root.mkdir(parents=True, exist_ok=True)
    if num_workers is not None:  # 0 started no worker: no chat explained, no error
        require_int("num_workers", num_workers, 1)
    require_int("max_retries", max_retries, 0)
    if on_error not in ON_ERROR:
        raise InvalidOptionError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    _check_attribute_kwargs(attribute_kwargs)
    items = _named(chats)
    _check_folders_differ([name for name, _ in items], root)
    columns = {name: _data_columns(chat) for name, chat in items}
    read = {*CHAT_KEYS, "conversations"}  # the last: ShareGPT's messages
    unread = {  # an OpenAI request's model, temperature, max_tokens: not this call's settings
        k
        for name, c in items
        if isinstance(c, Mapping)
        for k in c
        if k not in read and (k in GENERATION_KEYS or k not in columns[name])
    }
    if unread:
        warn_caller(
            f"the chats' keys {sorted(unread)} are not read: a chat given as a mapping holds "
            f"{', '.join(CHAT_KEYS)}, and other keys of plain values (a data set's labels) "
            "become summary.csv columns unless they name one of its own; generation "
            "settings go in attribute_kwargs' gen_args"
        )
    rows: list[dict[str, Any]] = []
    todo = []
    args = (model_factory, method_factory, input_kwargs, attribute_kwargs, target_factory)
    for name, chat in items:
        request = _request_digest(chat, args)
        row = _done_row(name, root / name / RESULT, request)
        if row is not None:
            rows.append(row)
        else:
            todo.append((name, chat, request))
    _check_ray_settings(
        use_ray,
        address=address,
        resources_per_worker=resources_per_worker,
        num_workers=num_workers,
    )
    ray = None if use_ray is False else start_ray(address, num_workers, resources_per_worker)
    if use_ray and ray is None:
        raise InvalidOptionError("use_ray=True needs Ray: pip install 'captum-mllm[ray]'")
    # closed on an error too: the error's line starts a line of its own
    with tqdm(total=len(items), initial=len(rows), disable=not show_progress, desc="chats") as bar:
        if ray is None:
            if todo and use_ray is None:
                warnings.warn(
                    "Ray is not installed: chats are explained one after another in this "
                    "process; pip install 'captum-mllm[ray]' spreads them over workers",
                    stacklevel=2,
                )
            worker = ChatExplainer(*args) if todo else None
            for name, chat, request in todo:
                assert worker is not None
                rows.append(worker.explain(name, chat, str(root / name), request, on_error))
                bar.update()
        else:
            for row in chats_on_ray(
                ray,
                args,
                todo,
                root,
                num_workers,
                resources_per_worker,
                max_retries,
                on_worker_start,
                on_error,
                address,
            ):
                rows.append(row)
                bar.update()
    failed = [str(row["chat"]) for row in rows if row.get("error")]
    if failed:
        warn_caller(
            f"{len(failed)} of {len(items)} chats raised and have no result (their 'error' "
            f"column says why; a rerun tries them again): {', '.join(failed[:5])}"
            + (", ..." if len(failed) > 5 else "")
        )
    order = {name: i for i, (name, _) in enumerate(items)}
    rows.sort(key=lambda row: order[str(row["chat"])])
    # The data set's own columns (a label, a category) follow the chat's name.
    rows = [{"chat": row["chat"], **columns[str(row["chat"])], **row} for row in rows]
    table = pd.DataFrame(rows)
    # Counts stay integers beside a failed chat's missing ones (not 6.0 in summary.csv)
    counts = ("n_features", "n_unique_coalitions", "n_stored_coalitions", "retries")
    table = table.astype({k: "Int64" for k in counts if k in table})
    table.to_csv(root / SUMMARY, index=False)
    _write_index(root, table)
    named = [str(name) for name in table["chat"]] if "chat" in table else []
    dataset_attributions(root, named).to_csv(root / ATTRIBUTIONS, index=False)
    return table


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


def _write_index(root: Path, table: pd.DataFrame) -> None:
    """``index.html``: the summary, each chat's name a link to its ``report.html``."""
    from urllib.parse import quote

    from captum_mllm.viz.report import render_index

    links = {
        str(name): f"{quote(str(name))}/{REPORT}"
        for name in table.get("chat", [])
        if (root / str(name) / REPORT).is_file()
    }
    (root / INDEX).write_text(render_index(table, links), encoding="utf-8")


def _request_digest(chat: Any, args: tuple[Any, ...]) -> str:
    """What a chat's saved result must have answered to be skipped: the chat,
    the ChatInput and attribute arguments, and the factories (see :func:`plain`)."""
    own = chat.get("input_kwargs") if isinstance(chat, Mapping) else None
    template = request_template_kwargs(chat) if isinstance(chat, Mapping) else {}
    extra = [plain(template, depth=16)] if template else []  # other tools: another prompt
    return digest(chat_digest(chat_of(chat)), plain(own), *(plain(a) for a in args), *extra)


def _done_row(name: str, result: Path, request: str) -> dict[str, Any] | None:
    """The summary row of a chat already explained for this request (its
    result's figures: a rerun's summary.csv keeps them), else None."""
    if not result.is_file():
        return None
    try:
        with warnings.catch_warnings():  # one a chat after an upgrade; the request decides
            warnings.simplefilter("ignore", InconsistentVersionWarning)
            saved = MultimodalLLMAttributionResult.load(result)
    except ResultFormatError:  # its arrays lost or cut short: explained again
        return None
    if saved.provenance.get("request") != request:
        return None
    return summary_row(name, saved, skipped=True)


def explain_sharded(
    chat: Any,
    model_factory: ModelFactory,
    method_factory: MethodFactory,
    input_kwargs: dict[str, Any] | None = None,
    attribute_kwargs: dict[str, Any] | None = None,
    *,
    store: str | Path,
    num_shards: int = 2,
    resources_per_worker: dict[str, float] | None = None,
    target_factory: Callable[[], Any] | None = None,
    address: str | None = None,
    use_ray: bool | None = None,
    seed: int = 0,
    max_retries: int = 3,
) -> Any:
    """One explanation whose coalitions are evaluated by several workers.

    The method's coalitions are split into ``num_shards`` shards by a stable
    hash; each worker evaluates its shard into a SQLite file of its own beside
    ``store`` (``run.sqlite`` -> ``run.shard1of4.sqlite``: SQLite's WAL needs
    each file's writers on one machine, which a file shared by workers on
    several machines of a network filesystem is not); then one worker merges
    them into ``store`` and runs the explanation over it, which evaluates
    nothing more, so the result equals one process's exactly. A rerun resumes
    each shard from its file (a new shard file, of another ``num_shards``, from
    ``store``). The method must choose its coalitions
    without looking at their values (not ``target_stderr``). Samplers draw
    alike in every worker: the store keeps the first draw (ours without
    ``seed=``: its seed; Captum's: torch's generator state), and every worker
    seeds torch's generator with ``seed``, so the draw is the same on a rerun.
    When a worker dies (killed, out of memory) its shard goes to a fresh one,
    which reads what the store kept, up to ``max_retries`` times.

    Args:
        chat: a ``Chat`` or a Hugging Face message list.
        model_factory, method_factory, input_kwargs, attribute_kwargs,
        target_factory, address, resources_per_worker: as :func:`explain_dataset`.
        store (str or Path): the SQLite file the shards' files are merged into.
        num_shards (int, optional): workers (one shard each); those the cluster has
            no room for start as others finish. Default: 2
        use_ray (bool, optional): False evaluates the shards in turn in-process. Default: None
        seed (int, optional): torch's seed in every worker. Default: 0
        max_retries (int, optional): retries of a shard whose worker died. Default: 3

    Returns:
        MultimodalLLMAttributionResult: the explanation.

    Examples::

        >>> res = explain_sharded(Chat().user("Why is the sky blue?"), load_default_model,
        ...                       ExactShapleyValues, store="sky.sqlite", num_shards=4)
    """
    require_int("num_shards", num_shards, 1)  # 0 ran unsharded, a float failed in range()
    require_int("max_retries", max_retries, 0)
    _check_attribute_kwargs(attribute_kwargs)
    args = (model_factory, method_factory, input_kwargs, attribute_kwargs, target_factory)
    _check_ray_settings(use_ray, address=address, resources_per_worker=resources_per_worker)
    ray = None if use_ray is False else start_ray(address, num_shards, resources_per_worker)
    shards = [(i, num_shards) for i in range(num_shards)]
    for shard in shards:  # here, on one machine: a new shard file starts from the store
        if Path(store).is_file() and not shard_file(store, shard).is_file():
            SQLiteStore.merged(shard_file(store, shard), [store])  # (another num_shards before)
    if ray is None:
        worker = ChatExplainer(*args)
        for shard in shards:
            worker.evaluate_shard(chat, str(store), shard, seed)
        return worker.combine(chat, str(store), seed, num_shards)
    return shards_on_ray(
        ray, args, chat, str(store), shards, seed, max_retries, resources_per_worker, address
    )
