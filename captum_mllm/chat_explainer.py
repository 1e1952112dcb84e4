"""One model replica explaining chats: the body of a data set's Ray worker, or
in-process (see :mod:`captum_mllm.distributed`). Each chat's result, page and
coalition store go into a folder of its own."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from captum_mllm.chat import REQUEST_KEYS, Chat, request_template_kwargs
from captum_mllm.coalitions import SQLiteStore
from captum_mllm.errors import InvalidOptionError
from captum_mllm.fingerprint import fix_digest
from captum_mllm.inputs import ChatInput
from captum_mllm.saved_results import RESULT_FILE

ModelFactory = Callable[[], Any]
MethodFactory = Callable[[Any], Any]
#: What a chat's folder holds.
RESULT = RESULT_FILE
REPORT = "report.html"
STORE = "coalitions.sqlite"


class ChatExplainer:
    """One model replica explaining chats (the body of a Ray actor, or in-process).

    Args:
        model_factory (callable): ``() -> ModelAdapter``, called once here.
        method_factory (callable): ``adapter -> attribution method`` (e.g. a
            class such as ``LeverageKernelShap``).
        input_kwargs (dict, optional): ``ChatInput`` arguments.
        attribute_kwargs (dict, optional): ``MultimodalLLMAttribution.attribute``
            arguments (``gen_args`` only for chats whose answer is generated).
        target_factory (callable, optional): ``() -> Target``. Default: log-probability
    """

    def __init__(
        self,
        model_factory: ModelFactory,
        method_factory: MethodFactory,
        input_kwargs: dict[str, Any] | None = None,
        attribute_kwargs: dict[str, Any] | None = None,
        target_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.model = model_factory()
        # The replica is this worker's own and never changes: its weights are read
        # for the stores' fingerprints once, not for every chat.
        fix_digest(getattr(self.model, "model", self.model))
        self.method_factory = method_factory
        self.input_kwargs = dict(input_kwargs or {})
        self.attribute_kwargs = dict(attribute_kwargs or {})
        self.target_factory = target_factory

    def _attribution(self, chat: Any) -> Any:
        from captum_mllm.attribution import MultimodalLLMAttribution
        from captum_mllm.contrastive import ContrastiveTarget

        foil = chat_foil(chat, self.target_factory)
        target: Any = None
        if foil is not None:
            target = ContrastiveTarget(foil)
        elif self.target_factory is not None:
            target = self.target_factory()
        method = self.method_factory(self.model)
        return MultimodalLLMAttribution(method, self.model, target=target)

    def explain(
        self,
        name: str,
        chat: Any,
        folder: str,
        request: str | None = None,
        on_error: str = "raise",
    ) -> dict[str, Any]:
        """Explain one chat into ``folder`` (result + store); returns its summary row.
        ``request`` (the digest a rerun compares) goes into the result's provenance.
        ``on_error="record"``: a chat that raises gets a row naming the error
        instead, and no result (a rerun tries it again)."""
        try:
            return self._explain(name, chat, folder, request)
        except Exception as exc:  # noqa: BLE001 (recorded with its type, not swallowed)
            if on_error == "raise":
                exc.add_note(f"in chat {name!r}")  # which of a data set's chats
                raise
            with contextlib.suppress(OSError):  # a folder holding nothing: not a result
                Path(folder).rmdir()
            return {"chat": name, "skipped": False, "error": f"{type(exc).__name__}: {exc}"}

    def _explain(self, name: str, chat: Any, folder: str, request: str | None) -> dict[str, Any]:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        with self._input(chat) as inp:
            kwargs = self._attribute_kwargs(inp)
            res = self._attribution(chat).attribute(inp, store=out / STORE, **kwargs)
        res.provenance["request"] = request
        res.save(out / RESULT)
        res.save_html(out / REPORT)  # a page to read it by, as `captum-mllm explain` writes
        return summary_row(name, res, skipped=False)

    @contextlib.contextmanager
    def _input(self, chat: Any) -> Iterator[Any]:
        """The chat's ``ChatInput``; a chat's own tools (``{"tools": [...]}``, as
        an OpenAI request holds them) and ``chat_template_kwargs`` reach the
        chat template meanwhile."""
        own = request_template_kwargs(chat) if isinstance(chat, Mapping) else {}
        before = getattr(self.model, "chat_template_kwargs", None)
        if own:
            if before is None:  # they would go unread
                raise InvalidOptionError(
                    f"a chat's {sorted(own)} are for a Hugging Face chat template"
                )
            self.model.chat_template_kwargs = {**before, **own}
        try:
            yield ChatInput(chat_of(chat), self.model, **self._input_kwargs(chat))
        finally:
            if own:
                self.model.chat_template_kwargs = before

    def _input_kwargs(self, chat: Any) -> dict[str, Any]:
        """The shared ``ChatInput`` arguments, plus a chat's own (``{"input_kwargs": ...}``)."""
        own = chat.get("input_kwargs") if isinstance(chat, Mapping) else None
        return {**self.input_kwargs, **(own or {})}

    def _attribute_kwargs(self, inp: Any) -> dict[str, Any]:
        """The shared ``attribute`` arguments; a chat that holds its answer takes
        no ``gen_args`` (``attribute`` refuses them: nothing is generated)."""
        if inp.response is None:
            return self.attribute_kwargs
        return {k: v for k, v in self.attribute_kwargs.items() if k != "gen_args"}

    def evaluate_shard(self, chat: Any, store: str, shard: tuple[int, int], seed: int = 0) -> int:
        """Evaluate one shard of a chat's coalitions into its own file beside
        ``store`` (:func:`shard_file`); returns how many. ``seed`` seeds
        torch's generator for the call."""

        with self._input(chat) as inp, _seeded(seed):
            res = self._attribution(chat).attribute(
                inp, store=shard_file(store, shard), shard=shard, **self._attribute_kwargs(inp)
            )
        return int(res.n_unique_coalitions)

    def combine(self, chat: Any, store: str, seed: int = 0, num_shards: int = 0) -> Any:
        """The explanation read from ``store`` (evaluates what is missing), once
        the files of its ``num_shards`` shards are merged into it; ``seed``
        seeds torch's generator for the call."""
        files = [shard_file(store, (i, num_shards)) for i in range(num_shards)]
        if any(f.is_file() for f in files):
            SQLiteStore.merged(store, [f for f in files if f.is_file()])
        with self._input(chat) as inp, _seeded(seed):
            attr = self._attribution(chat)
            return attr.attribute(inp, store=store, **self._attribute_kwargs(inp))

    def pid(self) -> int:
        import os

        return os.getpid()


def shard_file(store: str | Path, shard: tuple[int, int]) -> Path:
    """The file one shard of ``store``'s explanation is evaluated into
    (``run.sqlite`` -> ``run.shard1of4.sqlite``): each is written by one
    worker, as SQLite's WAL needs (it does not support writers of one file on
    several machines, as workers on a cluster's network filesystem were)."""
    path, (index, count) = Path(store), shard
    return path.with_name(f"{path.stem}.shard{index + 1}of{count}{path.suffix}")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """torch's CPU generator seeded for a block, and restored after it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


#: What a chat given as a mapping holds: a request's keys, and its own ChatInput arguments.
CHAT_KEYS = (*REQUEST_KEYS, "input_kwargs")


def chat_foil(chat: Any, target_factory: Callable[[], Any] | None = None) -> str | None:
    """A chat request's own ``"foil"``: the other answer its explanation weighs
    the answer against (:class:`~captum_mllm.ContrastiveTarget`), or None;
    refused beside a ``target_factory``, which names another value function."""
    foil = chat.get("foil") if isinstance(chat, Mapping) else None
    if foil is not None and not isinstance(foil, str):
        raise InvalidOptionError(f"a chat's foil is the other answer's text, got {foil!r}")
    if foil is not None and target_factory is not None:
        raise InvalidOptionError(
            f"a chat's foil ({foil!r}) makes its value function a ContrastiveTarget, and "
            "target_factory names another: drop one"
        )
    return foil


def chat_of(chat: Any) -> Chat:
    if isinstance(chat, Chat):
        return chat
    if isinstance(chat, Mapping) and "messages" in chat:
        return Chat.from_messages(chat["messages"])
    if isinstance(chat, Mapping) and "conversations" in chat:  # ShareGPT's
        return Chat.from_messages(chat["conversations"])
    return Chat.from_messages(chat)


#: The columns of :func:`~captum_mllm.distributed.explain_dataset`'s summary
#: (``error`` and ``retries`` where a chat raised or its worker died).
SUMMARY_COLUMNS = (
    "chat", "response", "n_features", "top_feature", "n_unique_coalitions",
    "n_stored_coalitions", "seconds", "skipped", "error", "retries",
)  # fmt: skip


def summary_row(name: str, res: Any, skipped: bool) -> dict[str, Any]:
    """A chat's row of the summary, from its result."""
    top = res.top_features(1)
    return {
        "chat": name,
        "response": res.response_text,
        "n_features": len(res.seq_attr),
        "top_feature": top["feature"].iloc[0] if len(top) else None,
        "n_unique_coalitions": res.n_unique_coalitions,
        "n_stored_coalitions": res.n_stored_coalitions,
        "seconds": round(res.wall_time, 3),
        "skipped": skipped,
    }
