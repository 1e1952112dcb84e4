"""Evaluating coalitions: each distinct coalition once, in batches, kept in a store.

Captum's method asks for the values of batches of coalitions
(``perturbations_per_eval`` at a time). :class:`CoalitionEvaluator` answers
from its store what it has already evaluated and sends only the others to
the value function. The store is in memory by default, or a SQLite file
(:class:`SQLiteStore`) that outlives the process: a rerun after an
interruption evaluates only what is missing. A file belongs to one
explanation, named by its fingerprint (model, chat, features, target,
seed); another explanation is refused with :class:`~captum_mllm.errors.StoreMismatchError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from captum_mllm.encoding import coalition_keys
from captum_mllm.errors import (
    InvalidOptionError,
    OutOfMemoryError,
    StoreMismatchError,
    warn_caller,
)
from captum_mllm.targets import TargetValues

# A stored evaluation: the coalition's value row and what the model said, if anything.
Entry = tuple[np.ndarray, Any]


class CoalitionStore(ABC):
    """Where evaluated coalitions are kept, keyed by :func:`coalition_key`."""

    @abstractmethod
    def get_many(self, keys: Iterable[bytes]) -> dict[bytes, Entry]:
        """The stored entries among ``keys``."""

    @abstractmethod
    def put_many(self, entries: dict[bytes, Entry]) -> None:
        """Keep a batch of entries (all or none)."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of stored coalitions."""

    def close(self) -> None:  # noqa: B027 (most stores hold nothing open)
        """Release what the store holds open."""

    def first(self, key: str, value: str) -> str:
        """The value first kept under ``key`` (``value``, when nothing was): how
        a rerun reads what the first run chose, such as its sampler's seed."""
        meta: dict[str, str] = self.__dict__.setdefault("_meta", {})
        return meta.setdefault(key, value)


class MemoryStore(CoalitionStore):
    """Entries in a dict, for one explanation in one process."""

    def __init__(self) -> None:
        self.entries: dict[bytes, Entry] = {}

    def get_many(self, keys: Iterable[bytes]) -> dict[bytes, Entry]:
        return {k: self.entries[k] for k in keys if k in self.entries}

    def put_many(self, entries: dict[bytes, Entry]) -> None:
        self.entries.update(entries)

    def __len__(self) -> int:
        return len(self.entries)


class SQLiteStore(CoalitionStore):
    """Entries in a SQLite file (WAL mode, one transaction per evaluated batch).

    Killing the process loses at most the batch being evaluated. The file
    holds one explanation: its fingerprint is written on first use and
    checked on every later one.

    Args:
        path (str or PathLike): the file; created when missing.
        fingerprint (dict): ``{part: digest}`` naming the explanation.

    Raises:
        StoreMismatchError: the file holds another explanation.

    Examples::

        >>> res = attr.attribute(inp, store="run.sqlite", n_samples=64)  # interrupted
        >>> res = attr.attribute(inp, store="run.sqlite", n_samples=64)  # resumes
    """

    def __init__(self, path: str | PathLike[str], fingerprint: dict[str, str]) -> None:
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:  # sqlite3's own errors named neither the file nor what to do
            self.db = sqlite3.connect(self.path, timeout=120)  # shards may write at once
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            with self.db:
                self.db.execute(
                    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)"
                )
                self.db.execute(
                    "CREATE TABLE IF NOT EXISTS coalitions "
                    "(key BLOB PRIMARY KEY, value BLOB NOT NULL, response TEXT)"
                )
        except sqlite3.DatabaseError as exc:  # a folder, another kind of file
            if hasattr(self, "db"):
                self.db.close()
            raise StoreMismatchError(
                f"{self.path} cannot be a coalition store ({exc}): name a new file or one an "
                "earlier run wrote"
            ) from None
        with self.db:  # the first writer names the file; later ones are checked
            self.db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('fingerprint', ?)", (json.dumps(fingerprint),)
            )
        row = self.db.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
        stored = json.loads(row[0])
        differs = sorted(
            k for k in stored.keys() | fingerprint.keys() if stored.get(k) != fingerprint.get(k)
        )
        if differs:
            self.db.close()
            raise StoreMismatchError(
                f"{self.path} holds another explanation: its {', '.join(differs)} "
                f"{'differ' if len(differs) > 1 else 'differs'} from this one's; use another "
                "store file"
            )

    def get_many(self, keys: Iterable[bytes]) -> dict[bytes, Entry]:
        out: dict[bytes, Entry] = {}
        keys = list(keys)
        for start in range(0, len(keys), 500):  # SQLite's parameter limit
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, value, response in self.db.execute(
                f"SELECT key, value, response FROM coalitions WHERE key IN ({marks})", chunk
            ):
                said = json.loads(response) if response is not None else None
                out[bytes(key)] = (np.frombuffer(value, dtype=np.float32), said)
        return out

    def put_many(self, entries: dict[bytes, Entry]) -> None:
        rows = [
            (key, np.asarray(value, dtype=np.float32).tobytes(), _json_or_none(said))
            for key, (value, said) in entries.items()
        ]
        with self.db:  # one transaction: a batch is stored whole or not at all
            self.db.executemany("INSERT OR REPLACE INTO coalitions VALUES (?, ?, ?)", rows)

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM coalitions").fetchone()[0])

    def first(self, key: str, value: str) -> str:
        with self.db:  # atomic: of shards starting at once, one writes and all read it
            self.db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (f"first:{key}", value))
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (f"first:{key}",)).fetchone()
        return str(row[0])

    def close(self) -> None:
        self.db.close()

    @classmethod
    def merged(cls, path: str | PathLike[str], sources: Sequence[str | PathLike[str]]) -> int:
        """Copy the coalitions (and first draws) of other store files of one
        explanation into ``path`` (created with their fingerprint when missing);
        returns the coalitions it then holds. How :func:`explain_sharded`'s
        shards, each written by one worker into a file of its own, become one
        store: SQLite's WAL needs every writer of a file on one machine.

        Raises:
            StoreMismatchError: the files hold different explanations.
            InvalidOptionError: no file is given.
        """
        if not sources:
            raise InvalidOptionError("merged needs at least one store file to copy from")
        prints = {}
        for source in sources:
            if not Path(source).is_file():  # connecting would create an empty file there
                raise StoreMismatchError(f"no store file at {os.path.abspath(source)}")
            try:
                with contextlib.closing(sqlite3.connect(source)) as db:
                    row = db.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
            except sqlite3.DatabaseError as exc:  # another kind of file
                raise StoreMismatchError(f"{source} cannot be a coalition store ({exc})") from None
            if row is None:
                raise StoreMismatchError(f"{source} holds no explanation")
            prints[str(source)] = json.loads(row[0])
        if any(p != next(iter(prints.values())) for p in prints.values()):
            raise StoreMismatchError(f"{sorted(prints)} hold different explanations")
        store = cls(path, next(iter(prints.values())))  # checks a file already there
        try:
            for source in prints:
                store.db.execute("ATTACH DATABASE ? AS source", (source,))
                try:
                    with store.db:
                        store.db.execute(
                            "INSERT OR IGNORE INTO coalitions SELECT * FROM source.coalitions"
                        )
                        store.db.execute(  # what each sampler drew first: alike in every shard
                            "INSERT OR IGNORE INTO meta SELECT * FROM source.meta "
                            "WHERE key LIKE 'first:%'"
                        )
                finally:
                    store.db.execute("DETACH DATABASE source")
            return len(store)
        finally:
            store.close()


def _json_or_none(said: Any) -> str | None:
    return None if said is None else json.dumps(said)


class CoalitionEvaluator:
    """Evaluates batches of coalitions through a store, each distinct one once.

    Args:
        evaluate (callable): ``(U, n_features) -> TargetValues`` for U coalitions.
        store (CoalitionStore, optional): Default: a new :class:`MemoryStore`
        enabled (bool, optional): when False every coalition is evaluated and
            nothing is stored. Default: True
        shard (tuple of int, optional): ``(index, count)``: evaluate and store
            only the coalitions of this shard (split by a hash of the
            coalition); the others get ``placeholder`` values unless the store
            has them. Default: None (all)
        placeholder_columns (int, optional): columns of a placeholder value. Default: 1
        row_length (callable, optional): ``(B, n_features) -> (B,)``, the model
            input length of each coalition: :meth:`evaluate_batches` and
            :meth:`prefetch` then batch coalitions of similar length together (less padding, fewer
            forwards; values are per coalition, so they do not change).
            Default: None (the order given)

    Attributes:
        n_requested (int): coalitions the method asked for.
        n_evaluated (int): coalitions evaluated now (store misses).
        n_stored (int): coalitions found in the store from an earlier run.
        responses (dict): coalition (tuple of 0/1) -> what the model said, for
            regenerating targets.
    """

    def __init__(
        self,
        evaluate: Callable[[Tensor], TargetValues],
        store: CoalitionStore | None = None,
        enabled: bool = True,
        shard: tuple[int, int] | None = None,
        placeholder_columns: int = 1,
        row_length: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.evaluate = evaluate
        self.row_length = row_length
        self.shard = shard
        self.placeholder_columns = placeholder_columns
        self.store = store if store is not None else MemoryStore()
        self.enabled = enabled
        self.n_requested = 0
        self.n_evaluated = 0
        self.n_stored = 0
        self.responses: dict[tuple[int, ...], Any] = {}
        self._seen: set[bytes] = set()
        self.max_rows: int | None = None  # lowered when a batch runs out of memory
        self.n_halvings = 0

    def __call__(self, perturbed: Tensor) -> Tensor:
        """Values of B coalitions: ``(B, n_features) -> (B, k)`` on their device."""
        return self.evaluate_batches(perturbed, len(perturbed))

    def evaluate_batches(
        self, perturbed: Tensor, batch: int, show_progress: bool = False
    ) -> Tensor:
        """Values of B coalitions, those not in the store ``batch`` at a time
        (shortest model inputs first when ``row_length`` is known):
        ``(B, n_features) -> (B, k)`` on their device. A batch's values come
        back to the host while the next one is prepared and launched, so an
        accelerator does not wait for the host between batches. ``show_progress``:
        a bar over the coalitions evaluated."""
        rows = perturbed.reshape(perturbed.shape[0], -1)
        self.n_requested += len(rows)
        step = max(batch, 1)
        if not self.enabled:
            self.n_evaluated += len(rows)
            parts = []
            for start in range(0, len(rows), step):
                parts.append(self._evaluate(rows[start : start + step]))
                self._log(rows[start : start + step], parts[-1].responses)
            return torch.cat([p.values for p in parts]).to(perturbed.device)
        keys = coalition_keys(rows)
        found = self.store.get_many(dict.fromkeys(keys))
        fresh_from_store = [k for k in found if k not in self._seen]
        self.n_stored += len(fresh_from_store)
        self._seen.update(found)
        first_of: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key not in found:
                if self.shard is not None and shard_of(key, self.shard[1]) != self.shard[0]:
                    # another shard's coalition: neither evaluated nor read from the store
                    found[key] = (np.zeros(self.placeholder_columns, np.float32), None)
                    continue
                first_of.setdefault(key, i)
        todo = list(first_of.values())
        if self.row_length is not None and len(todo) > step:
            order = torch.argsort(self.row_length(rows[todo]), stable=True).tolist()
            todo = [todo[i] for i in order]
        pending: tuple[_HostCopy, list[bytes], list[Any] | None] | None = None
        with _bar(show_progress, len(todo)) as advance:
            for start in range(0, len(todo), step):
                chosen = todo[start : start + step]
                result = self._evaluate(rows[chosen])
                launched = (_HostCopy(result.values), [keys[i] for i in chosen], result.responses)
                if pending is not None:
                    self._keep(found, *pending)
                    advance(len(pending[1]))
                pending = launched
            if pending is not None:
                self._keep(found, *pending)
                advance(len(pending[1]))
        for row, key in zip(rows, keys, strict=True):
            if found[key][1] is not None:
                self.responses[_as_tuple(row)] = found[key][1]
        return torch.from_numpy(np.stack([found[k][0] for k in keys])).to(perturbed.device)

    def _keep(
        self,
        found: dict[bytes, Entry],
        values: _HostCopy,
        keys: list[bytes],
        said: list[Any] | None,
    ) -> None:
        """Store one evaluated batch (waiting for its copy to the host)."""
        said = said or [None] * len(keys)
        new = {key: (row, s) for key, row, s in zip(keys, values.numpy(), said, strict=True)}
        self.n_evaluated += len(new)
        self.store.put_many(new)
        self._seen.update(new)
        found.update(new)

    def prefetch(self, rows: Tensor, batch: int, show_progress: bool = False) -> None:
        """Evaluate and keep coalitions a method is about to ask for, ``batch``
        at a time, each distinct one once (not counted as requested: the
        method's own asks are). ``show_progress``: a bar over the distinct
        coalitions evaluated (the method's own bar then runs on cache hits)."""
        if not self.enabled:
            return
        self.evaluate_batches(rows, batch, show_progress)
        self.n_requested -= len(rows)

    def _evaluate(self, rows: Tensor) -> TargetValues:
        """``evaluate`` in chunks; out of memory halves the chunk and retries
        (values are per coalition, so the result is the same), down to one
        coalition, then raises :class:`~captum_mllm.errors.OutOfMemoryError`."""
        parts: list[TargetValues] = []
        start, tried = 0, []
        while start < len(rows):
            size = min(len(rows) - start, self.max_rows or len(rows))
            try:
                parts.append(self.evaluate(rows[start : start + size]))
            except (MemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc):
                    raise
                release_memory()
                tried.append(size)
                if size == 1:
                    raise OutOfMemoryError(
                        f"out of memory evaluating one coalition of {rows.shape[1]} features "
                        f"(batches of {', '.join(map(str, tried))} coalitions tried): the "
                        "chat is too long for this device; shorten it, load the model in a "
                        "smaller dtype, or use a larger device"
                    ) from exc
                self.max_rows = size // 2
                self.n_halvings += 1
                warn_caller(
                    f"out of memory with {size} coalitions in a batch; going on with "
                    f"{self.max_rows} (the values do not change)",
                    ResourceWarning,
                )
                continue
            start += size
        if len(parts) == 1:
            return parts[0]
        said = [r for p in parts for r in (p.responses or [None] * len(p.values))]
        return TargetValues(
            torch.cat([p.values for p in parts]),
            parts[0].columns,
            said if any(p.responses for p in parts) else None,
        )

    def _log(self, rows: Tensor, said: list[Any] | None) -> None:
        for row, s in zip(rows, said or [], strict=False):
            self.responses[_as_tuple(row)] = s


@contextlib.contextmanager
def _bar(show: bool, total: int) -> Iterator[Callable[[int], Any]]:
    """``update(count)`` of a tqdm bar over ``total`` coalitions evaluated, or
    of nothing (every batch of every method passes here: no bar unless shown)."""
    if not show:
        yield lambda count: None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="evaluating coalitions", unit="coalition")
    try:
        yield bar.update
    finally:
        bar.close()


class _HostCopy:
    """A batch of values on its way to the host: from an accelerator the copy
    goes into pinned memory without waiting, and :meth:`numpy` waits for it
    alone (not for work launched after it)."""

    def __init__(self, values: Tensor) -> None:
        values = values.detach().float()
        self.event: torch.cuda.Event | None = None
        if values.device.type == "cuda":
            self.values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.values.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.values = values.cpu()

    def numpy(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.values.numpy()


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception is an allocator's out-of-memory (CUDA, MPS or CPU)."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text


def release_memory() -> None:
    """Give cached accelerator memory back before a smaller retry."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def shard_of(key: bytes, count: int) -> int:
    """The shard (0..count-1) a coalition key belongs to: a stable hash, not Python's."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % count


def _as_tuple(row: Tensor) -> tuple[int, ...]:
    return tuple(int(v != 0) for v in row.tolist())
