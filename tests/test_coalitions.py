"""The coalition evaluator and its stores: each coalition once, resumable runs."""

import copy
import functools
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from captum.attr import (
    FeatureAblation,
    ShapleyValues,
    ShapleyValueSampling,
    TextTemplateInput,
    TextTokenInput,
)

from captum_mllm import (
    Chat,
    ChatInput,
    CoalitionEvaluator,
    EmbeddingSimilarity,
    HFCausalLMAdapter,
    MemoryStore,
    MultimodalLLMAttribution,
    SQLiteStore,
    TargetValues,
)
from captum_mllm.errors import InvalidOptionError, StoreMismatchError
from captum_mllm.methods import PairedPermutationSampling

TARGET = "The capital of France is Paris."

# The child explains with exact Shapley values (32 coalitions for 5 words), two
# coalitions per batch, each batch slowed down so the parent can kill it midway.
CHILD = textwrap.dedent(
    """
    import sys, time
    import torch
    from captum.attr import ShapleyValues, ShapleyValueSampling
    from captum_mllm import Chat, ChatInput, HFCausalLMAdapter, MultimodalLLMAttribution
    from captum_mllm.testing import tiny_llama, tiny_tokenizer

    class Slow(HFCausalLMAdapter):
        def _score_rows(self, rows, *args, **kwargs):
            time.sleep(0.3)
            return super()._score_rows(rows, *args, **kwargs)

    torch.set_num_threads(1)
    model = Slow(tiny_llama(), tiny_tokenizer())
    chat = Chat().system("You are a helpful assistant.").user("Who are you, my friend?")
    attr = MultimodalLLMAttribution(ShapleyValues(model), model)
    print("started", flush=True)
    attr.attribute(ChatInput(chat, model), target=sys.argv[2], store=sys.argv[1],
                   perturbations_per_eval=2)
    """
)


def _rows(path):
    try:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT COUNT(*) FROM coalitions").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_a_killed_run_resumes_with_only_the_missing_coalitions(model, chat, tmp_path):
    store = tmp_path / "run.sqlite"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(store), TARGET],
        stdout=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        deadline = time.time() + 120
        while _rows(store) < 6:
            assert child.poll() is None, "the child ended before it could be killed"
            assert time.time() < deadline, "the child stored nothing in two minutes"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    done = _rows(store)
    assert 6 <= done < 32  # killed part way, every finished batch kept

    attr = MultimodalLLMAttribution(ShapleyValues(model), model)
    inp = ChatInput(chat, model)
    resumed = attr.attribute(inp, target=TARGET, store=store, perturbations_per_eval=4)
    assert resumed.n_stored_coalitions == done
    assert resumed.n_unique_coalitions == 32 - done  # only the missing ones
    whole = attr.attribute(inp, target=TARGET, perturbations_per_eval=4)
    assert whole.n_unique_coalitions == 32
    torch.testing.assert_close(resumed.seq_attr, whole.seq_attr, atol=1e-5, rtol=0)
    torch.testing.assert_close(resumed.token_attr, whole.token_attr, atol=1e-5, rtol=0)
    # A third run finds everything stored and calls the model for nothing.
    again = attr.attribute(inp, target=TARGET, store=store, perturbations_per_eval=4)
    assert again.n_unique_coalitions == 0 and again.n_model_calls <= 1  # the prefix only
    torch.testing.assert_close(again.token_attr, resumed.token_attr, atol=0, rtol=0)


@pytest.mark.parametrize(
    "method, kwargs",
    [(PairedPermutationSampling, {"budget": 40}), (ShapleyValueSampling, {"n_samples": 4})],
)
def test_a_sampler_rerun_on_its_store_resumes_the_same_draws(
    model, tmp_path, monkeypatch, method, kwargs
):
    """Without seed=, a rerun on the store of an interrupted run draws what
    that run drew (ours: its seed; Captum's: torch's generator as it began), so
    it evaluates only what is missing and gives that run's answer."""
    inp = ChatInput(Chat().user("Who are you, my friend? Tell me now please"), model)
    attr = MultimodalLLMAttribution(method(model), model)
    store = tmp_path / "run.sqlite"
    torch.manual_seed(1)
    began = torch.get_rng_state()
    score, calls = model.score_masked, []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 3:  # the first batch is kept, the second is in flight
            raise KeyboardInterrupt
        return score(*args, **kw)

    monkeypatch.setattr(model, "score_masked", interrupted)
    with pytest.raises(KeyboardInterrupt):
        attr.attribute(inp, target=TARGET, store=store, perturbations_per_eval=4, **kwargs)
    monkeypatch.undo()
    kept = _rows(store)
    assert kept > 0
    torch.manual_seed(2)  # what a new process would draw differs
    resumed = attr.attribute(inp, target=TARGET, store=store, perturbations_per_eval=4, **kwargs)
    assert resumed.n_stored_coalitions == kept
    torch.set_rng_state(began)
    seed = resumed.provenance["method_args"].get("seed")  # ours: the first run's
    whole = attr.attribute(
        inp, target=TARGET, perturbations_per_eval=4, **kwargs, **({"seed": seed} if seed else {})
    )
    assert resumed.n_unique_coalitions == whole.n_unique_coalitions - kept
    torch.testing.assert_close(resumed.seq_attr, whole.seq_attr, atol=1e-5, rtol=0)


def test_a_store_refuses_another_explanation(model, chat, tmp_path):
    store = tmp_path / "run.sqlite"
    attr = MultimodalLLMAttribution(ShapleyValues(model), model)
    attr.attribute(ChatInput(chat, model), target=TARGET, store=store)
    with pytest.raises(StoreMismatchError, match="its target differs from this one.s"):
        attr.attribute(ChatInput(chat, model), target="Something else.", store=store)
    with pytest.raises(StoreMismatchError, match="chat"):
        attr.attribute(ChatInput(chat.user("More."), model), target=TARGET, store=store)
    # Shards' files merge into one store of their explanation only
    other = tmp_path / "other.sqlite"
    attr.attribute(ChatInput(chat, model), target="Something else.", store=other)
    with pytest.raises(StoreMismatchError, match="hold different explanations"):
        SQLiteStore.merged(tmp_path / "merged.sqlite", [store, other])
    with pytest.raises(StoreMismatchError, match="target"):
        SQLiteStore.merged(store, [other])
    with pytest.raises(InvalidOptionError, match="at least one store file"):
        SQLiteStore.merged(store, [])
    with pytest.raises(StoreMismatchError, match="no store file at .*missing.sqlite"):
        SQLiteStore.merged(store, [store, tmp_path / "missing.sqlite"])  # a typo
    assert not (tmp_path / "missing.sqlite").exists()
    rows = sqlite3.connect(store).execute("SELECT COUNT(*) FROM coalitions").fetchone()[0]
    assert SQLiteStore.merged(tmp_path / "merged.sqlite", [store, store]) == rows > 0
    res = attr.attribute(ChatInput(chat, model), target=TARGET, store=tmp_path / "merged.sqlite")
    assert res.n_unique_coalitions == 0  # the merged copy is the store of that explanation
    # Another chat template in the tokenizer, with the same number of tokens.
    retemplated = copy.deepcopy(model.tokenizer)
    retemplated.chat_template = retemplated.chat_template.replace(
        "<|im_start|>assistant", "<|im_start|>user"
    )
    same_weights = HFCausalLMAdapter(model.model, retemplated)
    with pytest.raises(StoreMismatchError, match="chat"):
        attr3 = MultimodalLLMAttribution(ShapleyValues(same_weights), same_weights)
        attr3.attribute(ChatInput(chat, same_weights), target=TARGET, store=store)
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)  # one weight tensor changed
    with pytest.raises(StoreMismatchError, match="model"):
        attr2 = MultimodalLLMAttribution(ShapleyValues(other), other)
        attr2.attribute(ChatInput(chat, other), target=TARGET, store=store)


def test_a_model_accelerate_offloads_to_disk_resumes_the_in_memory_models_store(
    model, chat, tmp_path
):
    """A model too big for memory, loaded with device_map="auto" and offloaded
    layers (meta tensors here, their weights on disk): the store's model digest
    raised NotImplementedError. It reads the offloaded weights, so the digest
    is the in-memory model's and its store resumes."""
    from transformers import AutoModelForCausalLM

    model.model.save_pretrained(tmp_path / "model")
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model",
        device_map="auto",
        max_memory={"cpu": "400KB"},  # the embeddings fit; the layers go to disk
        offload_folder=tmp_path / "offload",
    )
    assert any(p.is_meta for p in offloaded.parameters())
    big = HFCausalLMAdapter(offloaded, model.tokenizer)
    store = tmp_path / "run.sqlite"
    first = MultimodalLLMAttribution(ShapleyValues(model), model)
    kept = first.attribute(ChatInput(chat, model), target=TARGET, store=store)
    again = MultimodalLLMAttribution(ShapleyValues(big), big)
    resumed = again.attribute(ChatInput(chat, big), target=TARGET, store=store)
    assert resumed.n_unique_coalitions == 0 and resumed.n_stored_coalitions > 0
    torch.testing.assert_close(resumed.seq_attr, kept.seq_attr)
    fresh = again.attribute(ChatInput(chat, big), target=TARGET)  # and it computes them
    torch.testing.assert_close(fresh.seq_attr, kept.seq_attr, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.ao's quantization
def test_a_quantized_models_store_resumes_and_tells_its_weights_apart(model, chat, tmp_path):
    """Quantized weights (torchao's tensor subclasses through transformers'
    TorchAoConfig, torch.ao's dynamic quantization) cannot be viewed as bytes:
    the store's model digest raised. They are digested by what they hold."""
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    model.model.save_pretrained(tmp_path / "model")
    torchao = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
    )
    dynamic = torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(model.model), {torch.nn.Linear}, dtype=torch.qint8
    )
    for i, quantized in enumerate((torchao, dynamic)):
        adapter = HFCausalLMAdapter(quantized, model.tokenizer)
        attr = MultimodalLLMAttribution(ShapleyValues(adapter), adapter)
        store = tmp_path / f"{i}.sqlite"
        kept = attr.attribute(ChatInput(chat, adapter), target=TARGET, store=store)
        resumed = attr.attribute(ChatInput(chat, adapter), target=TARGET, store=store)
        assert resumed.n_unique_coalitions == 0
        torch.testing.assert_close(resumed.seq_attr, kept.seq_attr)
        with pytest.raises(StoreMismatchError, match="model"):  # the float model's weights
            MultimodalLLMAttribution(ShapleyValues(model), model).attribute(
                ChatInput(chat, model), target=TARGET, store=store
            )
    other = copy.deepcopy(dynamic)
    layer = other.model.layers[0].mlp.up_proj
    weight = layer.weight()  # one quantized weight changed
    layer.set_weight_bias(
        torch.quantize_per_tensor(weight.dequantize() + 0.1, 0.01, 0, torch.qint8), layer.bias()
    )
    shifted = HFCausalLMAdapter(other, model.tokenizer)
    with pytest.raises(StoreMismatchError, match="model"):
        MultimodalLLMAttribution(ShapleyValues(shifted), shifted).attribute(
            ChatInput(chat, shifted), target=TARGET, store=tmp_path / "1.sqlite"
        )


def test_a_store_object_kept_between_calls_refuses_another_explanation(model, chat):
    # A MemoryStore is keyed by coalitions alone: another chat's values were read back
    store = MemoryStore()
    attr = MultimodalLLMAttribution(FeatureAblation(model), model)
    first = attr.attribute(ChatInput(chat, model), target=TARGET, store=store)
    again = attr.attribute(ChatInput(chat, model), target=TARGET, store=store)  # the same one
    assert again.n_unique_coalitions == 0 and torch.equal(again.seq_attr, first.seq_attr)
    with pytest.raises(StoreMismatchError, match="another explanation"):
        attr.attribute(ChatInput(chat, model), target="Something else.", store=store)


def test_a_store_that_cannot_be_one_or_is_switched_off(model, chat, tmp_path):
    attr = MultimodalLLMAttribution(FeatureAblation(model), model)
    (tmp_path / "notes.sqlite").write_text("not a database")
    with pytest.raises(StoreMismatchError, match="cannot be a coalition store"):
        attr.attribute(ChatInput(chat, model), target=TARGET, store=tmp_path / "notes.sqlite")
    calls = model.n_forward_calls  # sqlite3's own error came, after the answer's generation
    with pytest.raises(StoreMismatchError, match="is a folder, not a coalition store"):
        attr.attribute(ChatInput(chat, model), store=tmp_path)
    assert model.n_forward_calls == calls
    with pytest.raises(InvalidOptionError, match="cache_coalitions=False"):  # went unread
        attr.attribute(
            ChatInput(chat, model), target=TARGET, store=tmp_path / "s.sqlite",
            cache_coalitions=False,
        )  # fmt: skip
    assert not (tmp_path / "s.sqlite").exists()


def test_a_store_refuses_captums_inputs_with_other_baselines_or_mask(model, tmp_path):
    # The store once kept only Captum's input values: a rerun with other
    # baselines read the first run's values back.
    attr = MultimodalLLMAttribution(FeatureAblation(model), model)
    store = tmp_path / "run.sqlite"
    words = ["the", "cat", "sat"]
    attr.attribute(TextTemplateInput("{} {} {}", values=words), target=TARGET, store=store)
    for other in (
        TextTemplateInput("{} {} {}", values=words, baselines=["a", "dog", "ran"]),
        TextTemplateInput("{} {} {}", values=words, mask=[0, 0, 1]),
    ):
        with pytest.raises(StoreMismatchError, match="features"):
            attr.attribute(other, target=TARGET, store=store)
    tokens = tmp_path / "tokens.sqlite"
    attr.attribute(TextTokenInput("the cat sat", model.tokenizer), target=TARGET, store=tokens)
    with pytest.raises(StoreMismatchError, match="features"):
        attr.attribute(
            TextTokenInput("the cat sat", model.tokenizer, baselines=3), target=TARGET, store=tokens
        )


def test_a_store_tells_apart_two_embedding_lambdas_of_one_name(model, chat, tmp_path):
    # Both lambdas are named make_embedding.<locals>.<lambda>; their closures differ.
    def make_embedding(scale):
        return lambda texts: torch.tensor([[len(t), scale * t.count("a") + 1.0] for t in texts])

    store = tmp_path / "run.sqlite"
    for i, scale in enumerate((1.0, -5.0)):
        sim = EmbeddingSimilarity(make_embedding(scale), gen_args={"max_new_tokens": 4})
        attr = MultimodalLLMAttribution(FeatureAblation(model), model, target=sim)
        run = functools.partial(attr.attribute, ChatInput(chat, model), store=store)
        if i == 0:
            run()
        else:
            with pytest.raises(StoreMismatchError, match="target"):
                run()


def test_a_store_tells_apart_the_encode_methods_of_two_embedding_models(model, chat, tmp_path):
    # e.g. two sentence-transformers models' encode: one class and method name
    class Encoder(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            self.proj = torch.nn.Linear(2, 3)
            with torch.no_grad():
                self.proj.weight.copy_(torch.full((3, 2), 0.5 + seed))
                self.proj.bias.zero_()

        def encode(self, texts):
            counts = [[float(len(t)), float(t.count("a"))] for t in texts]
            return self.proj(torch.tensor(counts)).detach()

    store = tmp_path / "run.sqlite"
    for i, seed in enumerate((0, 0, 1)):
        sim = EmbeddingSimilarity(Encoder(seed).encode, gen_args={"max_new_tokens": 4})
        attr = MultimodalLLMAttribution(FeatureAblation(model), model, target=sim)
        run = functools.partial(attr.attribute, ChatInput(chat, model), store=store)
        if i < 2:
            assert run().n_stored_coalitions == (0 if i == 0 else 6)  # same weights: resumed
        else:
            with pytest.raises(StoreMismatchError, match="target"):
                run()


def test_each_distinct_coalition_is_evaluated_once_and_stores_agree(tmp_path):
    calls = []

    def evaluate(coalitions):
        calls.append(len(coalitions))
        total = coalitions.sum(1, keepdim=True)
        return TargetValues(torch.cat([total, 2 * total], 1), "tokens", ["x"] * len(coalitions))

    batch = torch.tensor([[1, 0, 1], [1, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.float)
    for store in (MemoryStore(), SQLiteStore(tmp_path / "s.sqlite", {"model": "m"})):
        calls.clear()
        evaluator = CoalitionEvaluator(evaluate, store)
        first = evaluator(batch)
        second = evaluator(batch[[3, 2]])
        assert calls == [3]  # three distinct coalitions, once each
        assert first.tolist() == [[2, 4], [2, 4], [0, 0], [3, 6]]
        assert second.tolist() == [[3, 6], [0, 0]]
        assert evaluator.n_requested == 6 and evaluator.n_evaluated == 3
        assert evaluator.responses[(1, 0, 1)] == "x" and len(store) == 3
        store.close()
    uncached = CoalitionEvaluator(evaluate, enabled=False)
    calls.clear()
    uncached(batch)
    assert calls == [4]
