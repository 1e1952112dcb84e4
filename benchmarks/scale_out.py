"""How explaining a data set scales over Ray workers.

1. Measured: ``explain_dataset`` on the tiny Llama, 8 chats, with 1 and 2 CPU
   actors (one thread each) on this machine: chats per second and the
   efficiency of the second actor (throughput ratio / 2).
2. Simulated: the GPU cost measured on one H200 for a model of LFM2-Audio-1.5B's
   shape (exact Shapley over 16 features of a 10 s question: 65,536
   coalitions at 1.3 ms each in batches of 128, about 85 s a chat), scaled
   down by ``--scale``, as sleeping Ray actors: one task a chat, with the
   result written to disk as ``explain_dataset`` does, so Ray's scheduling and
   transfer overheads are in the figures; workers 1, 8 and 64.

Run: ``python benchmarks/scale_out.py [--scale 0.002]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import ray

from captum_mllm import Chat
from captum_mllm.distributed import explain_dataset
from captum_mllm.methods import LeverageKernelShap
from captum_mllm.testing import tiny_hf_adapter

CHAT_SECONDS = 65_536 * 1.3e-3  # exact Shapley, 16 features, batched, one H200


def tiny_model():
    import torch

    torch.set_num_threads(1)
    return tiny_hf_adapter()


def measured(n_chats: int) -> None:
    questions = [f"Tell me about the number {i} and why it matters today" for i in range(n_chats)]
    chats = [Chat().system("Be brief.").user(q) for q in questions]
    settings = {"budget": 400, "seed": 0, "gen_args": {"max_new_tokens": 8}}
    rates = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as root:
            start = time.perf_counter()
            explain_dataset(
                chats, tiny_model, LeverageKernelShap, {}, settings, store_dir=root,
                num_workers=workers, resources_per_worker={"num_cpus": 1}, show_progress=False,
            )  # fmt: skip
            seconds = time.perf_counter() - start
        rates[workers] = n_chats / seconds
        print(f"  {workers} CPU actor(s): {n_chats} chats in {seconds:.1f} s, "
              f"{rates[workers]:.2f} chats/s (actor start-up included)")  # fmt: skip
    print(f"  efficiency of the second actor: {rates[2] / rates[1] / 2:.0%}")


@ray.remote(num_cpus=0.01)
class SleepingReplica:
    """A model replica whose chat costs ``seconds`` (sleep), writing its result."""

    def explain(self, name: str, seconds: float, folder: str) -> float:
        time.sleep(seconds)
        path = Path(folder) / f"{name}.json"
        path.write_text('{"seq_attr": [0.0]}')
        return seconds


def simulated(scale: float, workers_list: tuple[int, ...]) -> None:
    cost = CHAT_SECONDS * scale
    print(f"  a chat costs {CHAT_SECONDS:.0f} s on the GPU; simulated as {cost * 1000:.0f} ms")
    for workers in workers_list:
        n_chats = 4 * workers
        actors = [SleepingReplica.remote() for _ in range(workers)]
        start = time.perf_counter()
        ray.get([a.explain.remote("warm", 0.0, tempfile.gettempdir()) for a in actors])
        startup = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as root:
            start = time.perf_counter()
            pending = [f"chat_{i:05d}" for i in range(n_chats)]
            running = {a.explain.remote(pending.pop(), cost, root): a for a in actors}
            while running:
                (done,), _ = ray.wait(list(running), num_returns=1)
                actor = running.pop(done)
                if pending:
                    running[actor.explain.remote(pending.pop(), cost, root)] = actor
            seconds = time.perf_counter() - start
        ideal = n_chats * cost / workers
        real_hours = 1000 * CHAT_SECONDS / workers / 3600 / (ideal / seconds)
        print(
            f"  {workers:3d} workers: {n_chats:4d} chats in {seconds:6.2f} s "
            f"(ideal {ideal:.2f} s): efficiency {ideal / seconds:.0%}; actors up in "
            f"{startup:.1f} s; 1,000 chats would take {real_hours:.1f} h on {workers} GPUs"
        )
        for actor in actors:
            ray.kill(actor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", type=float, default=0.002)
    parser.add_argument("--chats", type=int, default=8)
    args = parser.parse_args()
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    print("measured, tiny Llama, LeverageKernelShap budget 400 a chat:")
    measured(args.chats)
    print("\nsimulated GPU replicas (sleep), Ray scheduling included:")
    simulated(args.scale, (1, 8, 64))
    ray.shutdown()


if __name__ == "__main__":
    main()
