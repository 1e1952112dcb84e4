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

import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from captum.attr import PerturbationAttribution
from tqdm.auto import tqdm

from captum_mllm.attribution import MultimodalLLMAttribution
from captum_mllm.chat import request_template_kwargs
from captum_mllm.chat_explainer import (
    CHAT_KEYS,
    RESULT,
    ChatExplainer,
    MethodFactory,
    ModelFactory,
    chat_foil,
    chat_of,
    shard_file,
    summary_row,
)
from captum_mllm.coalitions import SQLiteStore
from captum_mllm.dataset_tables import (
    ATTRIBUTIONS,
    GENERATION_KEYS,
    SUMMARY,
    check_folders_differ,
    data_columns,
    dataset_attributions,
    named_chats,
    write_index,
)
from captum_mllm.errors import (
    InconsistentVersionWarning,
    InvalidOptionError,
    ResultFormatError,
    require_int,
    warn_caller,
)
from captum_mllm.fingerprint import chat_digest, digest, plain
from captum_mllm.method_args import check_method_arguments
from captum_mllm.methods.base import ShapleyEstimator
from captum_mllm.ray_pool import chats_on_ray, shards_on_ray, start_ray
from captum_mllm.result import MultimodalLLMAttributionResult

__all__ = ["explain_dataset", "explain_sharded", "dataset_attributions", "ChatExplainer"]


#: What :func:`explain_dataset` does with a chat that raises.
ON_ERROR = ("raise", "record")


def _check_ray_settings(use_ray: bool | None, **settings: Any) -> None:
    """Ray's own settings with ``use_ray=False`` would go unread: refuse them."""
    given = sorted(k for k, v in settings.items() if v is not None)
    if use_ray is False and given:
        raise InvalidOptionError(
            f"{', '.join(given)} are Ray's settings, unread with use_ray=False"
        )


def _check_attribute_kwargs(
    attribute_kwargs: dict[str, Any] | None, method_factory: MethodFactory
) -> None:
    """``store`` and ``shard`` are set per chat here: given too, a TypeError came
    from inside a worker. A method class's own arguments are checked here too,
    before any worker loads a model (each chat raised them, after its answer)."""
    kwargs = attribute_kwargs or {}
    own = sorted({"store", "shard"} & set(kwargs))
    if own:
        raise InvalidOptionError(
            f"attribute_kwargs {own} are set here (each chat's store under store_dir, or "
            "explain_sharded's store= and num_shards=); leave them out"
        )
    if isinstance(method_factory, type) and issubclass(method_factory, PerturbationAttribution):
        attribute = set(inspect.signature(MultimodalLLMAttribution.attribute).parameters)
        method = method_factory(lambda x: x)  # the class's checks need no model
        ours = isinstance(method, ShapleyEstimator)  # seed= is the attribution's for Captum's
        skip = attribute if ours else {*attribute, "seed"}
        check_method_arguments(method, {k: v for k, v in kwargs.items() if k not in skip})


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
            (vLLM's) for the chat template, ``"input_kwargs"``: the chat's
            own ``ChatInput`` arguments (e.g. its ``transcripts``), and
            ``"foil"``: another answer to weigh the answer against
            (:class:`~captum_mllm.ContrastiveTarget`; also a column); its other
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
    _check_attribute_kwargs(attribute_kwargs, method_factory)
    items = named_chats(chats)
    check_folders_differ([name for name, _ in items], root)
    columns = {name: data_columns(chat) for name, chat in items}
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
            "become summary.csv columns unless they name one of its own; the run's "
            "generation settings are its own (attribute_kwargs' gen_args, the command "
            "line's flags such as --max-new-tokens)"
        )
    rows: list[dict[str, Any]] = []
    todo = []
    args = (model_factory, method_factory, input_kwargs, attribute_kwargs, target_factory)
    for name, chat in items:
        chat_foil(chat, target_factory)  # refused before any chat is explained
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
    write_index(root, table)
    named = [str(name) for name in table["chat"]] if "chat" in table else []
    dataset_attributions(root, named).to_csv(root / ATTRIBUTIONS, index=False)
    return table


def _request_digest(chat: Any, args: tuple[Any, ...]) -> str:
    """What a chat's saved result must have answered to be skipped: the chat,
    the ChatInput and attribute arguments, and the factories (see :func:`plain`)."""
    own = chat.get("input_kwargs") if isinstance(chat, Mapping) else None
    template = request_template_kwargs(chat) if isinstance(chat, Mapping) else {}
    extra = [plain(template, depth=16)] if template else []  # other tools: another prompt
    foil = chat_foil(chat)
    if foil is not None:  # another foil: another value function
        extra.append(["foil", foil])
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
    _check_attribute_kwargs(attribute_kwargs, method_factory)
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
