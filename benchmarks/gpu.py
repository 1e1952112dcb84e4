"""GPU: milliseconds per coalition, stock Captum against captum-mllm.

Two models with random weights, built from configs (nothing is downloaded):

1. A Llama of Llama-3.2-1B's shape (2048 wide, 16 layers, GQA 32/8, 128k
   vocabulary), a ~100-token system prompt, a 12-word user turn and a 12-token
   target. Rows: stock Captum ``LLMAttribution(ShapleyValueSampling)`` on its
   sequence path (``forward_in_tokens=False``) and its default path; ours at
   the same budget, and ours batched at a larger budget; a plain batched
   forward of whole prompts (the batching limit).
2. A model of LFM2-Audio-1.5B's shape (LFM2-1.2B backbone, 17-layer conformer,
   6-layer depthformer), a 10 s clip cut in 1 s features plus 6 words, and a
   32-token answer. Rows: liquid-audio's own path one coalition at a time
   (``ChatState`` + ``_prefill`` + one LFM forward, as the CPU benchmark
   ``lfm2_audio.py``) and ours batched.

Both sections also time paired permutations on fresh seeds ("new shapes": no
batch shape seen before, as in a user's first explanation of a chat), as
shipped and with cuDNN's attention allowed first, as torch's default order
does on Hopper and later (it builds a plan for every new shape).

For each row: ms per coalition scored, the speed-up against the stock rows,
and the fraction of the bf16 FLOP limit reached (model FLOPs: 2 x parameters
x tokens pushed, plus attention and the logits computed), against both the
datasheet's dense bf16 figure and an 8192^3 bf16 matrix product measured in
the same run. ``--tiny`` runs the same code with tiny shapes on the CPU in
seconds (the test suite does, so the script cannot rot).

``--compile`` adds our Llama rows with the decoder compiled
(``model.get_decoder().compile(dynamic=True)``, as a user would; the adapters
run the decoder they are given) and the compile time; ``--ungrouped`` runs
packed attention as transformers would (a copy of the keys and values per
query head, where ours puts each key/value head's query heads in its rows), to
compare on the same machine; ``--sweep`` times only our batched run at
several coalitions a forward (what the library's default should be); ``--profile`` prints
where our batched runs spend their time (host functions, kernels, operators by
input shape, and the share of the wall time the GPU was busy).

Run on a GPU: ``python benchmarks/gpu.py``; check anywhere: ``python benchmarks/gpu.py --tiny``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
from captum.attr import LLMAttribution, ShapleyValueSampling
from text_vs_captum import SYSTEM, TARGET, USER  # the same text chat as the CPU benchmark
from torch.nn.attention import SDPBackend

from captum_mllm import Chat, ChatInput, HFCausalLMAdapter, LFM2AudioAdapter
from captum_mllm import MultimodalLLMAttribution as Ours
from captum_mllm.captum_compat import text_template_input
from captum_mllm.methods import ExactShapleyValues, PairedPermutationSampling
from captum_mllm.models import decoder, packing
from captum_mllm.models.batching import default_perturbations_per_eval
from captum_mllm.testing import speech_like, tiny_lfm2_audio, tiny_tokenizer

SPOKEN_TEXT = "Please answer this question very briefly"

LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
)  # fmt: skip
LLAMA_TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=600,
)  # fmt: skip
# LFM2-1.2B: 16 layers, attention at 2, 5, 8, 10, 12 and 14, the others gated convolutions.
_ATTN = {2, 5, 8, 10, 12, 14}
LFM2_1B = dict(
    vocab_size=65536, hidden_size=2048, intermediate_size=12288, num_hidden_layers=16,
    layer_types=["full_attention" if i in _ATTN else "conv" for i in range(16)],
    num_attention_heads=32, num_key_value_heads=8, initializer_range=0.02,
)  # fmt: skip
CONFORMER = dict(
    n_layers=17, d_model=512, n_heads=8, subsampling_conv_channels=256, ff_expansion_factor=4,
    xscaling=False,  # liquid-audio 1.3's xscaling=True path fails (math not imported)
)  # fmt: skip
DEPTHFORMER = dict(layers=6, dim=1024)
PPE = 256  # coalitions per forward of our runs

# Dense bf16 tensor-core peak from NVIDIA's datasheets (SXM parts, no sparsity).
DATASHEET_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PROFILE = False  # --profile: print where the time of captum-mllm's batched runs goes


def profiled(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` under cProfile and print its 25 costliest functions (own
    time); on a GPU, also under torch.profiler: the 25 costliest kernels and
    the share of the wall time the GPU was busy."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    out = prof.runcall(fn)
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    if torch.cuda.is_available():
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        with profile(activities=activities, record_shapes=True) as trace:
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
        events = trace.key_averages()
        # kernels only: an operator's own device time is its kernels' again
        busy = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e6
        print(events.table(sort_by="self_device_time_total", row_limit=25))
        by_shape = trace.key_averages(group_by_input_shape=True)
        print(
            by_shape.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=40)
        )
        print(f"GPU kernels {busy:.3f} s of {wall:.3f} s wall ({100 * busy / wall:.0f}% busy)")
    return out


def timed(fn: Callable[[], Any], device: torch.device, repeats: int = 1) -> tuple[Any, float]:
    """Best wall time in seconds of ``repeats`` runs, and the last output."""
    best, out = float("inf"), None
    for _ in range(repeats):
        torch.manual_seed(0)
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return out, best


class FlopCounter:
    """Counts the forwards of a decoder and the FLOPs they do: 2 x body
    parameters per token pushed, attention over the keys each query sees
    (causal), and the logits computed."""

    def __init__(self, decoder: torch.nn.Module, head_dim_total: int, n_attn: int, vocab: int):
        self.body = sum(p.numel() for n, p in decoder.named_parameters() if "embed_tokens" not in n)
        self.attn_width, self.n_attn, self.vocab = head_dim_total, n_attn, vocab
        self.width = next(decoder.parameters()).shape[-1]
        self.calls = self.tokens = 0
        self.flops = 0.0
        # kept out of a compiled decoder's graph (its guards would read the counts)
        count = torch.compiler.disable(self._count)
        decoder.register_forward_pre_hook(count, with_kwargs=True)

    def _count(self, _: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs["inputs_embeds"]
        batch, width = x.shape[:2]
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        past = cache.get_seq_length() if cache is not None else 0
        self.calls += 1
        self.tokens += batch * width
        self.flops += 2.0 * self.body * batch * width
        packed = kwargs.get("packed_rows")
        if packed is not None:  # rows end to end: attention reads each row's keys only
            self.flops += 4.0 * self.n_attn * self.attn_width * float(packed.mask.sum())
        else:
            self.flops += 4.0 * self.n_attn * self.attn_width * batch * width * (past + width / 2)

    def add_logits(self, rows: int) -> None:
        self.flops += 2.0 * self.width * self.vocab * rows

    def reset(self) -> None:
        self.calls = self.tokens = 0
        self.flops = 0.0


@contextlib.contextmanager
def default_device(device: torch.device) -> Iterator[None]:
    """Build modules directly on the device (a 1B model built on the CPU first
    takes longer than the whole benchmark)."""
    with torch.device(device):
        yield


def matmul_tflops(device: torch.device, size: int) -> float:
    """Measured bf16 (float32 on the CPU) matrix-product throughput."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _, secs = timed(lambda: [a @ b for _ in range(10)], device)
    return 10 * 2 * size**3 / secs / 1e12


# Short column names of the stock rows.
BASELINES = {"sequence path": "seq", "default path": "default", "one at a time": "loop"}


def report(rows: list[tuple[str, float, int, float]], peaks: dict[str, float]) -> None:
    """rows: (name, seconds, coalitions scored, model FLOPs); the "stock" rows
    are the baselines of the "vs" columns."""
    base = {
        short: secs / n
        for name, secs, n, _ in rows
        for key, short in BASELINES.items()
        if name.startswith("stock") and name.endswith(key)
    }
    cols = " ".join(f"{'vs ' + k:>10s}" for k in base)
    print(f"{'run':40s} {'coalitions':>10s} {'ms/coalition':>12s} {cols} " + " ".join(
        f"{'% ' + k:>12s}" for k in peaks
    ))  # fmt: skip
    for name, secs, n, flops in rows:
        per = secs / n
        ratios = " ".join(f"{b / per:9.1f}x" for b in base.values())
        shares = " ".join(f"{100 * flops / secs / 1e12 / p:11.1f}%" for p in peaks.values())
        print(f"{name:40s} {n:10d} {1e3 * per:12.3f} {ratios} {shares}")


def token_counts(inp: ChatInput, masks: torch.Tensor, n_target: int) -> tuple[float, float]:
    """Mean tokens a coalition needs pushed after the untouched prefix, and the
    limit: those from its first absent position on (the rest is in the full
    chat's cache; the Hugging Face adapter reads it from there, LFM2-Audio's
    hybrid cache does not)."""
    present = inp.to_model_input(masks).present
    pushed = present[:, inp.prefix_len :].sum(1) + n_target - 1
    absent = ~present
    width = present.shape[1]
    first = torch.where(absent.any(1), absent.long().argmax(1), width)
    from_pos = torch.cat([present.flip(1).cumsum(1).flip(1), present.new_zeros(len(present), 1)], 1)
    limit = from_pos.gather(1, first[:, None])[:, 0] + n_target - 1
    return pushed.float().mean().item(), limit.float().mean().item()


def print_tokens(flops: FlopCounter, scored: int, inp: ChatInput, masks: torch.Tensor, t: int):
    after, limit = token_counts(inp, masks, t)
    print(
        f"tokens pushed per coalition: {flops.tokens / scored:.1f} (padding included), "
        f"{after:.1f} after the untouched prefix, {limit:.1f} from the first absent "
        "feature on (the limit of prefix sharing)"
    )


def fresh_shape_rows(
    adapter: Any, inp: ChatInput, target: torch.Tensor, budget: int, flops: FlopCounter
) -> list[tuple[str, float, int, float]]:
    """Paired permutations on seeds no earlier run drew, so that every batch
    has a shape not seen before (as in a user's first explanation of a chat):
    as shipped, and with cuDNN's attention allowed, as torch's default order
    does (it builds a plan for every new shape)."""
    shipped = decoder.ATTENTION_KERNELS
    with_cudnn = [SDPBackend.CUDNN_ATTENTION, *shipped]
    rows = []
    runs = [("new shapes", shipped), ("new shapes, cuDNN", with_cudnn)]
    for seed, (label, kernels) in enumerate(runs, start=1000):
        decoder.ATTENTION_KERNELS = kernels
        try:
            call = functools.partial(
                Ours(PairedPermutationSampling(adapter), adapter).attribute,
                inp, target=target, budget=budget, perturbations_per_eval=PPE, seed=seed,
            )  # fmt: skip
            flops.reset()
            res, secs = timed(call, adapter.device)
        finally:
            decoder.ATTENTION_KERNELS = shipped
        flops.add_logits(res.n_unique_coalitions * len(target))
        name = f"captum-mllm, paired, {label}"
        rows.append((name, secs, res.n_unique_coalitions, flops.flops))
    return rows


COMPILE = False  # --compile: also time our runs with the decoder compiled
SWEEP = False  # --sweep: only our batched run, at several coalitions a forward


def sweep_rows(
    adapter: Any,
    inp: ChatInput,
    target: torch.Tensor,
    flops: FlopCounter,
    method: Callable[[Any], Any],
    sizes: list[int],
    **kwargs: Any,
) -> list[tuple[str, float, int, float]]:
    """One explanation at each number of coalitions a forward (best of 2 after
    a warm-up), and the most memory it held."""
    rows = []
    for size in sizes:
        call = functools.partial(
            Ours(method(adapter), adapter).attribute,
            inp, target=target, perturbations_per_eval=size, **kwargs,
        )  # fmt: skip
        call()
        if adapter.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(adapter.device)
        flops.reset()
        res, secs = timed(call, adapter.device, repeats=2)
        flops.flops /= 2
        flops.add_logits(res.n_unique_coalitions * len(target))
        peak = ""
        if adapter.device.type == "cuda":
            peak = f", {torch.cuda.max_memory_allocated(adapter.device) / 2**30:.1f} GiB"
        name = f"{method.__name__}, {size} a forward{peak}"
        rows.append((name, secs, res.n_unique_coalitions, flops.flops))
    return rows


def compiled_rows(
    adapter: Any, inp: ChatInput, target: torch.Tensor, eager: Any, flops: FlopCounter
) -> list[tuple[str, float, int, float]]:
    """Exact Shapley and paired permutations on fresh seeds with the decoder
    compiled as a user would (``model.get_decoder().compile(dynamic=True)``:
    the adapters run the decoder they are given): the compile time, the
    values against eager and ms per coalition."""
    adapter.model.get_decoder().compile(dynamic=True)
    rows = []
    for label, method, kwargs in [
        ("exact 2^n, batched", ExactShapleyValues, {}),
        ("paired, new shapes", PairedPermutationSampling, {"budget": 4096, "seed": 2000}),
    ]:
        call = functools.partial(
            Ours(method(adapter), adapter).attribute,
            inp, target=target, perturbations_per_eval=PPE, **kwargs,
        )  # fmt: skip
        if method is ExactShapleyValues:
            _, first = timed(call, adapter.device)
            print(f"compiled: first explanation {first:.1f} s (compiling)")
        flops.reset()
        res, secs = timed(call, adapter.device)
        flops.add_logits(res.n_unique_coalitions * len(target))
        rows.append((f"captum-mllm, {label}, compiled", secs, res.n_unique_coalitions, flops.flops))
        if method is ExactShapleyValues:
            diff = (res.token_attr - eager.token_attr).abs().max().item()
            print(f"compiled against eager: max |token_attr difference| {diff:.2e}")
    return rows


def llama_section(device: torch.device, dtype: torch.dtype, tiny: bool, peaks: dict) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    shape = LLAMA_TINY if tiny else LLAMA_1B
    config = LlamaConfig(
        **shape, max_position_embeddings=4096, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
        initializer_range=0.2 if tiny else 0.02,
    )  # fmt: skip
    torch.manual_seed(0)
    with default_device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    adapter = HFCausalLMAdapter(model, tok)
    inp = ChatInput(Chat().system(SYSTEM).user(USER), adapter)
    target = torch.tensor(tok.encode(TARGET, add_special_tokens=False))
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"\nLlama, {n_params / 1e9:.2f}B parameters ({dtype}), prompt {len(inp.encoded)} tokens "
        f"(untouched prefix {inp.prefix_len}), {inp.n_itp_features} word features, "
        f"{len(target)} target tokens, packed rows {'on' if adapter.packs() else 'off'}"
    )
    heads = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    flops = FlopCounter(model.model, heads, config.num_hidden_layers, config.vocab_size)
    if SWEEP:
        sizes = [256, 512, 1024] if tiny else [1024, 2048, 4096, 8192]
        report(sweep_rows(adapter, inp, target, flops, ExactShapleyValues, sizes), peaks)
        return
    captum_inp = text_template_input(inp)
    stock = LLMAttribution(ShapleyValueSampling(model), tok)
    n_same = 2 if tiny else 4
    rows = []

    def stock_run(in_tokens: bool, n_samples: int) -> tuple[Any, float, int, float]:
        stock.attribute(captum_inp, target=target, forward_in_tokens=in_tokens, n_samples=1)
        flops.reset()
        res, secs = timed(
            lambda: stock.attribute(
                captum_inp, target=target, forward_in_tokens=in_tokens, n_samples=n_samples
            ),
            device,
        )
        calls = flops.calls if not in_tokens else flops.calls // len(target)
        # Captum computes the logits of every position it pushes.
        flops.add_logits(flops.tokens)
        return res, secs, calls, flops.flops

    seq, secs, calls, fl = stock_run(False, n_same)
    rows.append(("stock Captum sequence path", secs, calls, fl))
    _, secs_d, calls_d, fl_d = stock_run(True, 1)
    rows.append(("stock Captum default path", secs_d, calls_d, fl_d))

    # Captum's sampler batches within one permutation (at most n + 1 coalitions a
    # forward); our estimators hand over all of a round's coalitions at once.
    # The last row names no perturbations_per_eval: the library's default for the device.
    runs = [
        (
            "captum-mllm, Captum SVS, same budget",
            ShapleyValueSampling,
            {"n_samples": n_same, "perturbations_per_eval": PPE},
        ),
        ("captum-mllm, exact 2^n, batched", ExactShapleyValues, {"perturbations_per_eval": PPE}),
        (
            f"captum-mllm, exact 2^n, {default_perturbations_per_eval(device)} a forward",
            ExactShapleyValues,
            {},
        ),
    ]
    done: dict[str, Any] = {}
    for label, method, kwargs in runs:
        ours = Ours(method(adapter), adapter)
        call = functools.partial(ours.attribute, inp, target=target, **kwargs)
        call()  # warm-up
        flops.reset()
        res, secs = timed(call, device)
        flops.add_logits(res.n_unique_coalitions * len(target))
        rows.append((label, secs, res.n_unique_coalitions, flops.flops))
        if label.endswith("batched"):
            n = inp.n_itp_features
            every = torch.tensor([[(c >> i) & 1 for i in range(n)] for c in range(2**n)])
            print_tokens(flops, res.n_unique_coalitions, inp, every, len(target))
        if PROFILE and label.startswith("captum-mllm, exact"):  # at PPE and the default
            print(f"\nprofile: {label}")
            profiled(call)
        if label.endswith("a forward"):  # the same values, batched otherwise
            before = done["captum-mllm, exact 2^n, batched"].token_attr
            diff = (res.token_attr - before).abs().max().item()
            print(f"exact, {PPE} a forward against the default: ", end="")
            print(f"max |token_attr difference| {diff:.2e} ", end="")
            print(f"(of {before.abs().max().item():.2e})")
        done[label] = res
        if method is ShapleyValueSampling:
            diff = (res.token_attr - seq.token_attr).abs().max().item()
            scale = seq.token_attr.abs().max().item()
            print(
                f"same budget: max |token_attr - stock sequence path| {diff:.2e} (of {scale:.2e})"
            )

    rows += fresh_shape_rows(adapter, inp, target, 256 if tiny else 4096, flops)
    if COMPILE:
        rows += compiled_rows(adapter, inp, target, done["captum-mllm, exact 2^n, batched"], flops)

    # The batching limit: one forward of PPE whole prompts (+ the target), no reuse.
    ids = torch.cat([inp.encoded.input_ids, target[:-1]]).to(device)
    batch = ids[None].expand(PPE if not tiny else 8, -1)
    with torch.inference_mode():
        model(input_ids=batch, logits_to_keep=len(target))
        flops.reset()
        _, secs = timed(lambda: model(input_ids=batch, logits_to_keep=len(target)), device, 3)
    flops.flops /= 3  # timed ran it 3 times and keeps the best time
    flops.add_logits(len(batch) * len(target))
    compiled = " (decoder compiled)" if COMPILE else ""
    name = f"plain forward, {len(batch)} whole prompts{compiled}"
    rows.append((name, secs, len(batch), flops.flops))
    if PROFILE:
        with torch.inference_mode():
            profiled(lambda: model(input_ids=batch, logits_to_keep=len(target)))
    report(rows, peaks)


def lfm2_section(device: torch.device, dtype: torch.dtype, tiny: bool, peaks: dict) -> None:
    from liquid_audio import ChatState

    with default_device(device):
        if tiny:
            model, processor = tiny_lfm2_audio()
        else:
            model, processor = tiny_lfm2_audio(
                lfm=LFM2_1B, encoder=CONFORMER, depthformer=DEPTHFORMER
            )
    model = model.to(device, dtype).eval()
    processor = processor.to(device)
    adapter = LFM2AudioAdapter(model, processor)
    seconds = 2.0 if tiny else 10.0
    wave = speech_like(seconds)
    chat = Chat().system("Respond briefly.").user(SPOKEN_TEXT, audio=wave, sample_rate=16000)
    inp = ChatInput(chat, adapter, audio_unit=seconds / 10)
    target = torch.arange(300, 300 + (8 if tiny else 32))
    response = adapter.check_target(target)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"\nLFM2-Audio shape, {n_params / 1e9:.2f}B parameters ({dtype}), {len(inp.encoded)} "
        f"positions, {inp.n_itp_features} features (10 audio of {seconds / 10:.1f} s), "
        f"{len(target)} target tokens, packed rows {'on' if adapter.packs() else 'off'}"
    )
    lfm = model.lfm
    cfg = lfm.config
    n_attn = sum(t == "full_attention" for t in cfg.layer_types)
    flops = FlopCounter(lfm, cfg.hidden_size, n_attn, cfg.vocab_size)

    def loop_one(coalition: torch.Tensor) -> torch.Tensor:
        """One coalition through liquid-audio's own path, conformer included."""
        st = ChatState(processor, dtype=dtype)
        st.new_turn("system")
        st.add_text("Respond briefly.")
        st.end_turn()
        st.new_turn("user")
        st.add_audio(wave[None].to(device), 16000)
        st.add_text(SPOKEN_TEXT)
        st.end_turn()
        st.new_turn("assistant")
        with torch.inference_mode():
            embeds = model._prefill(**st)[0]
            present = inp.to_model_input(coalition[None]).present[0].to(device)
            x = torch.cat([embeds[present], lfm.embed_tokens(target[:-1].to(device))])
            h = lfm(inputs_embeds=x[None]).last_hidden_state[0]
            n = int(present.sum())
            logits = h[n - 1 : n - 1 + len(target)] @ lfm.embed_tokens.weight.T
            return logits.float().log_softmax(-1).gather(1, target[:, None].to(device))[:, 0]

    if SWEEP:
        method, budget = PairedPermutationSampling, 128 if tiny else 2048
        sizes = [64, 128] if tiny else [256, 1024, 2048]
        report(sweep_rows(adapter, inp, target, flops, method, sizes, budget=budget, seed=0), peaks)
        return
    g = torch.Generator().manual_seed(0)
    coalitions = (torch.rand(8, inp.n_itp_features, generator=g) > 0.5).long()
    loop_one(coalitions[0])  # warm-up
    flops.reset()
    loop_vals, secs = timed(lambda: torch.stack([loop_one(c) for c in coalitions]), device)
    flops.add_logits(len(coalitions) * len(target))
    rows = [("stock liquid-audio, one at a time", secs, len(coalitions), flops.flops)]
    with torch.inference_mode():
        ours_vals = adapter.score_masked(inp.to_model_input(coalitions), response)
    diff = (ours_vals.cpu() - loop_vals.cpu()).abs().max().item()
    print(f"the same 8 coalitions: max |log-prob difference| {diff:.2e}")

    attr = Ours(PairedPermutationSampling(adapter), adapter)
    call = functools.partial(
        attr.attribute, inp, target=target, budget=128 if tiny else 2048, perturbations_per_eval=PPE
    )
    call()  # warm-up
    flops.reset()
    res, secs = timed(call, device)
    flops.add_logits(res.n_unique_coalitions * len(target))
    rows.append(
        ("captum-mllm, paired permutations, batched", secs, res.n_unique_coalitions, flops.flops)
    )
    n = inp.n_itp_features  # coalitions of permutation sampling: the heads of random orders
    orders = torch.stack([torch.randperm(n, generator=g) for _ in range(64)])
    heads = torch.stack([torch.isin(torch.arange(n), o[:k]) for o in orders for k in range(1, n)])
    print_tokens(flops, res.n_unique_coalitions, inp, heads.long(), len(target))
    if PROFILE:
        profiled(call)
    rows += fresh_shape_rows(adapter, inp, target, 128 if tiny else 2048, flops)
    report(rows, peaks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU check)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip", choices=["llama", "lfm2"], action="append", default=[])
    parser.add_argument("--profile", action="store_true", help="profile our batched runs")
    parser.add_argument("--compile", action="store_true", help="also with the decoder compiled")
    parser.add_argument("--sweep", action="store_true", help="only ours, at several batch sizes")
    parser.add_argument(
        "--ungrouped",
        action="store_true",
        help="packed attention as transformers runs it: keys and values copied per query head",
    )
    args = parser.parse_args(argv)
    global PROFILE, COMPILE, SWEEP
    PROFILE, COMPILE, SWEEP = args.profile, args.compile, args.sweep
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        print(f"{name}, torch {torch.__version__}")
        peaks = {k: v for k, v in DATASHEET_TFLOPS.items() if k in name}
        peaks["measured"] = matmul_tflops(device, 8192)
    else:
        peaks = {"measured": matmul_tflops(device, 256 if args.tiny else 2048)}
    print("bf16 peaks (TFLOP/s): " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()))
    # grouped_attention is taken for transformers' own function only
    ungrouped = functools.partial(packing.sdpa_attention_forward)
    with (
        mock.patch.object(packing, "sdpa_attention_forward", ungrouped)
        if args.ungrouped
        else contextlib.nullcontext()
    ):
        if "llama" not in args.skip:
            llama_section(device, dtype, args.tiny, peaks)
        if "lfm2" not in args.skip:
            lfm2_section(device, dtype, args.tiny, peaks)


if __name__ == "__main__":
    main()
