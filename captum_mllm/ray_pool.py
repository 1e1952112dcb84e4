"""Ray actors for :mod:`captum_mllm.distributed`: a local cluster sized for its
workers, workers it can hold (or a refusal), each a :class:`ChatExplainer`
replica; chats or shards handed to idle workers, a dead worker's work given to
a fresh one, and errors raised as the caller's own."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from captum_mllm.chat_explainer import ChatExplainer
from captum_mllm.errors import CaptumMLLMError, InvalidModelError, InvalidOptionError, warn_caller


def start_ray(
    address: str | None, num_workers: int | None, resources: dict[str, Any] | None = None
) -> Any:
    """Ray, started (or joined at ``address``) once; None when it is not installed.
    A local cluster holds the CPUs its workers ask for (one each by default)."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"address": address} if address else {}
        if not address and num_workers:
            per_worker = (resources or {}).get("num_cpus", 1)
            kwargs["num_cpus"] = max(math.ceil(num_workers * per_worker), 1)
        ray.init(include_dashboard=False, log_to_driver=False, **kwargs)
    return ray


#: Ray's names of the resources an actor asks for.
_RESOURCE_NAMES = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}


def _actor_class(ray: Any, resources: dict[str, Any], address: str | None) -> Any:
    """The worker class asking for ``resources``, which the cluster must be able
    to hold: an actor it cannot was waited for without a word, for ever."""
    asked = {_RESOURCE_NAMES.get(k, k): v for k, v in resources.items() if k != "resources"}
    asked.update(resources.get("resources") or {})
    has = ray.cluster_resources()
    short = {k: v for k, v in asked.items() if isinstance(v, int | float) and has.get(k, 0) < v}
    if short:
        held = ", ".join(f"{k} {has.get(k, 0):g}" for k in short)
        why = (
            f"a worker asks for {', '.join(f'{k} {v:g}' for k, v in short.items())} and the "
            f"Ray cluster holds {held} in all"
        )
        if address is None:  # a local cluster never grows: nothing would start
            raise InvalidOptionError(f"{why}: give resources_per_worker it can hold")
        warn_caller(f"{why}: the workers wait until it grows (an autoscaler's nodes)")
    return ray.remote(**resources)(_RayWorker)


class _RayWorker(ChatExplainer):
    """:class:`ChatExplainer` as a Ray actor. An error building its model is
    raised by each of its tasks instead of its ``__init__``: Ray keeps only the
    text of an error there, and restarts the worker for each chat's retries
    (a mistyped model name took minutes, retrying, then printed a traceback)."""

    def __init__(self, *args: Any) -> None:
        try:
            super().__init__(*args)
        except Exception as exc:  # noqa: BLE001 (raised by every task: _started)
            self.start_error: Exception | None = exc
        else:
            self.start_error = None

    def _started(self) -> None:
        error = self.start_error
        if isinstance(error, CaptumMLLMError):
            raise error
        if error is not None:  # ours, so the caller gets it in a line (_worker_error)
            raise InvalidModelError(
                f"a worker could not build its model: {type(error).__name__}: {error}"
            )

    def explain(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self._started()  # whatever on_error says: no chat could be explained
        return super().explain(*args, **kwargs)

    def evaluate_shard(self, *args: Any, **kwargs: Any) -> int:
        self._started()
        return super().evaluate_shard(*args, **kwargs)

    def combine(self, *args: Any, **kwargs: Any) -> Any:
        self._started()
        return super().combine(*args, **kwargs)


def _worker_error(exc: Exception) -> BaseException:
    """What a worker raised: ours as it is (a mistake in the request, said in a
    line and caught by its type), another inside Ray's, which holds the
    worker's traceback."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, CaptumMLLMError) else exc


def _default_resources(ray: Any) -> dict[str, float]:
    return {"num_gpus": 1} if ray.cluster_resources().get("GPU", 0) >= 1 else {"num_cpus": 1}


def chats_on_ray(
    ray: Any,
    args: tuple[Any, ...],
    todo: list[tuple[str, Any, str]],
    root: Path,
    num_workers: int | None,
    resources: dict[str, float] | None,
    max_retries: int,
    on_worker_start: Callable[[list[Any]], None] | None,
    on_error: str = "raise",
    address: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Schedule chats on a pool of actors; replace dead actors and retry their chat."""
    if not todo:
        return
    resources = resources or _default_resources(ray)
    if num_workers is None:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        num_workers = max(1, gpus) if "num_gpus" in resources else 1
    actor_cls = _actor_class(ray, resources, address)
    actors = [actor_cls.remote(*args) for _ in range(min(num_workers, len(todo)))]
    if on_worker_start is not None:
        on_worker_start(actors)
    pending = list(reversed(todo))  # pop() takes them in order
    tries: dict[str, int] = {}
    running: dict[Any, tuple[int, str, Any, str]] = {}  # future -> (slot, name, chat, request)

    def submit(slot: int) -> None:
        name, chat, request = pending.pop()
        future = actors[slot].explain.remote(name, chat, str(root / name), request, on_error)
        running[future] = (slot, name, chat, request)

    try:
        for slot in range(len(actors)):
            if pending:
                submit(slot)
        while running:
            (future,), _ = ray.wait(list(running), num_returns=1)
            slot, name, chat, request = running.pop(future)
            try:
                row = ray.get(future)
            except ray.exceptions.RayTaskError as exc:
                raise _worker_error(exc) from None
            except ray.exceptions.RayActorError as exc:
                tries[name] = tries.get(name, 0) + 1
                if tries[name] > max_retries and on_error == "raise":
                    raise
                actors[slot] = None
                if tries[name] <= max_retries:
                    pending.append((name, chat, request))
                else:  # killed each time (out of memory?): recorded, the others go on
                    died = f"{type(exc).__name__}: its worker died on every try ({tries[name]})"
                    yield {"chat": name, "skipped": False, "error": died, "retries": max_retries}
            else:
                yield {**row, "retries": tries.get(name, 0)}
            if pending:
                if actors[slot] is None:  # a fresh replica; the store kept the work
                    actors[slot] = actor_cls.remote(*args)
                submit(slot)
            elif actors[slot] is not None:
                # Idle: its resources let a worker still waiting for them start (a chat
                # given to one the cluster had no room for waited for ever)
                ray.kill(actors[slot])
                actors[slot] = None
    finally:
        for actor in actors:
            if actor is not None:
                ray.kill(actor)


def shards_on_ray(
    ray: Any,
    args: tuple[Any, ...],
    chat: Any,
    store: str,
    shards: list[tuple[int, int]],
    seed: int,
    max_retries: int,
    resources: dict[str, float] | None,
    address: str | None,
) -> Any:
    """Evaluate each shard of one explanation on an actor of its own, give a
    shard whose actor died to a fresh one, and combine them on the last."""
    actor_cls = _actor_class(ray, resources or _default_resources(ray), address)
    actors = {shard: actor_cls.remote(*args) for shard in shards}
    running = {actors[s].evaluate_shard.remote(chat, store, s, seed): s for s in shards}
    tries = dict.fromkeys(shards, 0)
    try:
        while True:
            (done,), _ = ray.wait(list(running), num_returns=1)
            shard = running.pop(done)
            try:
                ray.get(done)  # a shard's error, raised here
                if not running:  # the last one combines the shards
                    return ray.get(actors[shard].combine.remote(chat, store, seed, len(shards)))
            except ray.exceptions.RayTaskError as exc:
                raise _worker_error(exc) from None
            except ray.exceptions.RayActorError:
                tries[shard] += 1
                if tries[shard] > max_retries:
                    raise
                actors[shard] = actor_cls.remote(*args)  # a fresh replica; the store kept the work
                running[actors[shard].evaluate_shard.remote(chat, store, shard, seed)] = shard
                continue
            # A worker still waiting for room (more shards than the cluster runs at
            # once) starts when one is done; all waited for each other before
            ray.kill(actors[shard])
    finally:
        for actor in actors.values():
            ray.kill(actor)
