import json
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
from captum.attr import ShapleyValueSampling

from captum_mllm import ChatInput, MultimodalLLMAttribution
from captum_mllm.heap import ENV_SWITCH, heap_retained, retained_heap

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
PAGES = (96 << 20) // 4096  # a 96 MiB block: above glibc's largest dynamic mmap threshold

# In a fresh process (a known heap): page faults of each of 4 mallocs in a row
# of a 96 MiB block, each filled and freed before the next, outside, inside and
# after retained_heap(), inside one after a nested entry has exited, and after
# release_heap(). Plain malloc: a tensor's aligned allocation can leave a small
# chunk behind that keeps the freed block from the heap's top for a few rounds.
PROBE = textwrap.dedent(
    """
    import ctypes, ctypes.util, json, resource
    from captum_mllm import release_heap, retained_heap

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]

    def loop(n=4):
        out = []
        for _ in range(n):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            block = libc.malloc(96 << 20)
            ctypes.memset(block, 1, 96 << 20)
            libc.free(block)
            out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return out

    out = {"outside": loop()}
    with retained_heap():
        out["inside"] = loop()
    out["after"] = loop()
    with retained_heap():
        with retained_heap():
            pass
        out["nested"] = loop()
    with retained_heap():
        loop()
    release_heap()
    out["released"] = loop(1)
    print(json.dumps(out))
    """
)


def probe() -> dict[str, list[int]]:
    run = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(run.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def probed() -> dict[str, list[int]]:
    return probe()


@glibc
def test_freed_memory_is_reused_inside_kept_after_and_given_back_on_release(probed):
    out = probed
    assert min(out["outside"]) > PAGES // 2  # each block mapped afresh, page by page
    assert max(out["inside"][1:]) < PAGES // 100  # the freed block is reused
    assert min(out["after"][1:]) > PAGES // 2  # glibc's thresholds are back
    assert out["released"][0] > PAGES // 2  # release_heap handed the pages back


@glibc
@pytest.mark.parametrize(
    "name, value",
    [(ENV_SWITCH, "0"), ("MALLOC_TOP_PAD_", "0"), ("GLIBC_TUNABLES", "glibc.malloc.top_pad=0")],
)
def test_the_users_own_allocator_settings_win(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with retained_heap():
        assert not heap_retained()


@glibc
def test_entries_nest_and_the_outermost_exit_ends_it(probed):
    assert max(probed["nested"][1:]) < PAGES // 100  # an inner exit left the outer one be
    with retained_heap():
        with retained_heap():
            assert heap_retained()
        assert heap_retained()
    assert not heap_retained()


@glibc
def test_attribute_runs_with_the_heap_retained_and_the_same_values(model, chat, monkeypatch):
    inp = ChatInput(chat, model)
    seen = []
    score = model.score_rows

    def spy(*args, **kwargs):
        seen.append(heap_retained())
        return score(*args, **kwargs)

    monkeypatch.setattr(model, "score_rows", spy)
    attr = MultimodalLLMAttribution(ShapleyValueSampling(model), model)

    def explain():
        torch.manual_seed(0)
        return attr.attribute(inp, target="I am an assistant.", n_samples=2).token_attr

    retained = explain()
    assert seen and all(seen) and not heap_retained()
    monkeypatch.setenv(ENV_SWITCH, "0")
    seen.clear()
    plain = explain()
    assert seen and not any(seen)
    assert torch.equal(retained, plain)
