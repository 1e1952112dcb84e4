"""Packed rows (Part 17): a batch's coalitions end to end in one row, attention
unpacking them; every value as the right-padded path gives it, to the bit on
the CPU, and models that read across positions outside attention left padded."""

from __future__ import annotations

import pytest
import torch
from conftest import adapter_and_input
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from captum_mllm import Chat, ChatInput, HFCausalLMAdapter, LFM2AudioAdapter
from captum_mllm.models.math_attention import math_attention_forward
from captum_mllm.models.packing import PackedRows, packed_attention_forward
from captum_mllm.testing import tiny_hf_adapter, tiny_tokenizer


class Layer(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("cached", [0, 5])
@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("inner", [math_attention_forward, sdpa_attention_forward])
def test_each_packed_row_attends_to_its_own_positions_only(cached, share, inner):
    """Against each row's attention computed alone: its queries over the
    cached positions it sees, then its own positions up to the query's. Rows
    that begin alike (the same ids, first position and cached positions seen)
    share those positions. Under transformers' own ``"sdpa"`` attention the
    packed rows fold each key/value head's query heads into its rows
    (:func:`grouped_attention`) instead of copying keys and values per head."""
    gen = torch.Generator().manual_seed(cached)
    starts = [[1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7], [9], [1, 2, 8], list(range(30, 49))]
    rows = [torch.tensor(r if share else [100 * b + t for t in r]) for b, r in enumerate(starts)]
    lens = [len(r) for r in rows]
    seen = [cached, cached, cached, 2, 0] if cached else None
    layout, ids = PackedRows.of(rows, cached, seen, [cached] * len(rows))
    n = layout.real
    # [1, 2, 3, 4] pushed once, and [1, 2] unless [1, 2, 8] sees other cached positions
    assert n == (sum(lens) if not share else 30 if cached else 28)
    heads, kv_heads, dim = 4, 2, 8
    # queries as projections give them: a (1, H, N, D) view of (1, N, H, D)
    q = torch.randn(1, max(n, 16), heads, dim, generator=gen).transpose(1, 2)
    k, v = (torch.randn(1, kv_heads, cached + max(n, 16), dim, generator=gen) for _ in range(2))
    layer = Layer(heads // kv_heads)
    out, _ = packed_attention_forward(inner)(
        layer, q, k, v, None, scaling=dim**-0.5, packed_rows=layout
    )
    assert out.shape == (1, max(n, 16), heads, dim)
    for b, length in enumerate(lens):
        at = layout.places[b, :length]
        assert torch.equal(ids[0, at], rows[b])
        reads = cached if seen is None else seen[b]
        keys = torch.cat([torch.arange(reads), cached + at])
        mask = torch.cat(
            [torch.ones(length, reads, dtype=torch.bool), torch.ones(length, length).tril() > 0], 1
        )
        alone, _ = math_attention_forward(
            layer, q[:, :, at], k[:, :, keys], v[:, :, keys], mask[None, None], scaling=dim**-0.5
        )
        torch.testing.assert_close(out[:, at], alone, atol=1e-6, rtol=1e-6)


def test_layout_positions_and_padding_to_enough_rows():
    rows = [torch.tensor([5, 6]), torch.tensor([7, 8, 9])]
    layout, ids = PackedRows.of(rows, cached=4, seen=[4, 6], first_positions=[4, 6], fill=3)
    assert ids.tolist() == [[5, 6, 7, 8, 9] + [3] * 11]  # 16 positions at least
    assert layout.positions.tolist() == [[4, 5, 6, 7, 8] + [0] * 11]
    assert layout.real == 5 and layout.width == 16
    assert layout.mask.shape == (2, 1, 16, 4 + 16)
    assert layout.mask[1, 0, 2].tolist() == [True] * 4 + [True] * 3 + [False] * 13


def _packed_calls(model):
    """Positions pushed by each forward of the model's backbone that was given packed rows."""
    calls: list[int] = []

    def hook(_, args, kwargs):
        if kwargs.get("packed_rows") is not None:
            calls.append(kwargs["packed_rows"].real)

    backbone = model._lfm if isinstance(model, LFM2AudioAdapter) else model.model.get_decoder()
    return calls, backbone.register_forward_pre_hook(hook, with_kwargs=True)


def _model_input_response(kind, deterministic):
    """An adapter, a chat's input and a response to score, for each kind of
    model the adapters pack."""
    model, inp = adapter_and_input(speech=kind == "lfm2-audio", deterministic=deterministic)
    if kind == "lfm2-audio":  # two text items, then three audio frames of 8 codes
        items = torch.full((5, 9), -1)
        items[:2, 0] = torch.tensor([300, 301])
        items[2:, 1:] = torch.randint(0, 100, (3, 8), generator=torch.Generator().manual_seed(1))
        return model, inp, model.response(items)
    if kind == "lfm2 text":  # transformers' LFM2 (convolutions and attention), as a chat LLM
        model = HFCausalLMAdapter(_lfm2_text_model(), tiny_tokenizer())
        model.deterministic = deterministic
        inp = ChatInput(inp.chat, model)
    return model, inp, model.response(torch.arange(300, 306))


@pytest.mark.parametrize("kind", ["llama", "lfm2-audio", "lfm2 text"])
@pytest.mark.parametrize("deterministic", [None, False])
@pytest.mark.parametrize("per_step", [False, True])
def test_packed_scores_are_the_padded_scores(kind, deterministic, per_step):
    """Every coalition's score as right-padded batches give it: to the bit when
    deterministic (the CPU default), within float32 rounding otherwise; with
    and without the prefix cache (whose shared positions the Llama's rows
    read; LFM2's convolution states), on both adapters."""
    model, inp, response = _model_input_response(kind, deterministic)
    n = inp.n_itp_features
    coalitions = torch.randint(0, 2, (24, n), generator=torch.Generator().manual_seed(3))
    coalitions[0] = 1  # the full chat: it reads the most shared positions
    masked = inp.to_model_input(coalitions)
    assert model.packs()
    calls, handle = _packed_calls(model)
    for prefix in (None, model.prefill(inp.to_model_input())):
        model.packing = False
        padded = model.score_masked(masked, response, prefix, per_step=per_step)
        model.packing = True
        before = len(calls)
        packed = model.score_masked(masked, response, prefix, per_step=per_step)
        assert len(calls) > before  # the packed path ran
        if deterministic is None:
            assert torch.equal(packed, padded), (packed - padded).abs().max()
        else:
            torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    handle.remove()


def test_packed_scores_are_the_padded_scores_on_smollm2(smol):
    """The real model (grouped-query attention, 30 layers): to the bit."""
    chat = Chat().system("You are a helpful assistant.").user("What is the capital of France?")
    inp = ChatInput(chat, smol)
    coalitions = torch.randint(0, 2, (12, inp.n_itp_features), generator=torch.Generator())
    masked = inp.to_model_input(coalitions)
    response = smol.response(torch.tensor(smol.tokenizer.encode("Paris is the capital.")))
    prefix = smol.prefill(inp.to_model_input())
    scores = {}
    for packing in (False, True):
        smol.packing = packing
        scores[packing] = smol.score_masked(masked, response, prefix)
    assert smol.packs()
    assert torch.equal(scores[True], scores[False])


def test_packed_rows_push_no_padding():
    """The point of packing: one forward pushes each distinct start of a row
    (with the fed target) once, no padding: rows that begin alike share
    positions, and fewer positions are pushed than the rows hold."""
    model, inp = adapter_and_input(speech=False)
    coalitions = torch.randint(0, 2, (40, inp.n_itp_features), generator=torch.Generator())
    masked = inp.to_model_input(coalitions)
    response = model.response(torch.arange(300, 304))
    prefix = model.prefill(inp.to_model_input())
    assert model.packs()  # (the probe's own forwards before counting)
    calls, handle = _packed_calls(model)
    model.score_masked(masked, response, prefix)
    handle.remove()
    rows = model._coalition_rows(masked, prefix)
    fed = response.ids[:-1].tolist()
    leads = prefix.leads(rows)
    starts = set()  # every distinct start of a row (after what it reads from the cache)
    for r, n in zip(rows, leads, strict=True):
        ids = r.tolist()[n:] + fed
        starts.update((n, tuple(ids[: k + 1])) for k in range(len(ids)))
    held = sum(len(r) - n + len(fed) for r, n in zip(rows, leads, strict=True))
    assert sum(calls) == len(starts) < held
    assert len(calls) == 1


def _tiny_model(config_class, model_class, **extra):
    """A tiny seeded model of a transformers architecture for the tiny tokenizer."""
    config = config_class(
        vocab_size=len(tiny_tokenizer()),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **extra,
    )
    torch.manual_seed(0)
    return model_class(config).eval()


def _lfm2_text_model():
    from transformers import Lfm2Config, Lfm2ForCausalLM

    return _tiny_model(Lfm2Config, Lfm2ForCausalLM, layer_types=["conv", "full_attention"])


def _sliding_window_model():
    from transformers import MistralConfig, MistralForCausalLM

    return _tiny_model(MistralConfig, MistralForCausalLM, sliding_window=6)


def test_a_sliding_window_model_stays_padded():
    """A sliding window is not attention's padded layout: the probe turns
    packing off (its scores stay right-padded)."""
    model = HFCausalLMAdapter(_sliding_window_model(), tiny_tokenizer())
    assert not model.packs()
    assert tiny_hf_adapter().packs()  # the same probe passes a plain decoder


def test_packing_off_for_a_decoder_that_drops_the_keyword():
    """A decoder that does not pass ``packed_rows`` on to its layers fails the probe."""

    class Dropping(torch.nn.Module):
        def __init__(self, decoder: torch.nn.Module) -> None:
            super().__init__()
            self.decoder = decoder

        def forward(self, packed_rows=None, **kwargs):
            return self.decoder(**kwargs)

    model = tiny_hf_adapter()
    inner = model.model
    model._head_split = (Dropping(inner.get_decoder()), inner.get_output_embeddings())
    model._head_probed = True  # as if the split probe had passed
    assert not model.packs()


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.lists(st.integers(0, 2), max_size=6), st.integers(0, 1)),
        min_size=1,
        max_size=8,
    )
)
def test_the_layout_pushes_each_distinct_start_once(rows):
    """Random rows over three ids (so that many begin alike), each reading
    all or none of 3 cached positions, against brute force: every place
    holds its row's id at its position, a start is pushed once per distinct
    (cached positions seen, ids so far), and every packed position unpacks
    to a place that holds it."""
    ids_rows = [torch.tensor(r, dtype=torch.long) for r, _ in rows]
    seen = [3 * s for _, s in rows]
    layout, ids = PackedRows.of(ids_rows, cached=3, seen=seen, first_positions=seen, fill=7)
    starts = {(3 * s, tuple(r[: k + 1])) for r, s in rows for k in range(len(r))}
    assert layout.real == len(starts)
    assert ids.shape[1] == max(len(starts), 16)
    positions = layout.positions[0]
    for b, (r, _) in enumerate(rows):
        at = layout.places[b, : len(r)]
        assert ids[0, at].tolist() == r
        assert positions[at].tolist() == [seen[b] + w for w in range(len(r))]
    width = layout.width
    owner = layout.unpack[: layout.real]
    held = layout.places[owner // width, owner % width]
    assert torch.equal(held, torch.arange(layout.real))


@pytest.mark.parametrize("collide", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_rows_get_one_id_per_distinct_vector(monkeypatch, collide, dtype):
    """Vectors equal to the bit share an id, others do not (0.0 and -0.0
    included); when hashes collide (here: all of them), the ids still hold."""
    from captum_mllm.models import packing

    if collide:
        monkeypatch.setattr(packing, "hash_bits", lambda bits: bits.new_zeros(len(bits)).long())
    pool = torch.randn(5, 6, generator=torch.Generator().manual_seed(0)).to(dtype)
    pool[4] = 0.0
    pool[3] = -pool[4]  # -0.0: equal in value, not in bits
    picks = [[0, 1, 2, 1], [1, 1], [3, 4, 0], [2]]
    ids, table = packing.distinct_ids([pool[p] for p in picks])
    for got, p in zip(ids, picks, strict=True):
        assert torch.equal(table[got], pool[p])
    assert [g.tolist() for g in ids][1] == [ids[0][1].item()] * 2
    assert len(table) == 5 and len({int(i) for g in ids for i in g}) == 5


@pytest.mark.parametrize("speech", [False, True])
def test_the_probe_reads_a_prefix_cache_too(monkeypatch, speech):
    """Packing that is right alone but wrong after cached positions (here:
    attention that sees none of them) fails the probe too."""
    from captum_mllm.models import packing

    of = packing.PackedRows.of.__func__

    def blind(cls, rows, cached=0, seen=None, *args, **kwargs):
        return of(cls, rows, cached, [0] * len(rows), *args, **kwargs)

    monkeypatch.setattr(packing.PackedRows, "of", classmethod(blind))
    model, _ = adapter_and_input(speech=speech)
    assert not model.packs()


def test_a_suffix_is_each_row_followed_by_it():
    rows = [torch.tensor([1, 2, 3]), torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)]
    suffix = torch.tensor([7, 8])
    with_suffix, ids = PackedRows.of(rows, 3, [3, 3, 2], [3, 4, 3], 0, suffix=suffix)
    joined, want = PackedRows.of([torch.cat([r, suffix]) for r in rows], 3, [3, 3, 2], [3, 4, 3])
    assert torch.equal(ids, want)
    for name in ("places", "positions", "queries", "keys", "unpack", "mask"):
        assert torch.equal(getattr(with_suffix, name), getattr(joined, name)), name
    assert with_suffix.real == joined.real


@pytest.mark.parametrize(
    ("text_baseline", "audio_baseline"),
    [("drop", "drop"), ("replace", "embedding"), ("drop", "silence")],
)
def test_lfm2_rows_of_ids_score_and_share_as_their_vectors_do(text_baseline, audio_baseline):
    """LFM2-Audio lays its coalitions out as ids built on the host: they score
    as the rows of their vectors do (whose ids the device finds by hashing
    the vectors), to the bit, and push as few positions: equal tokens read
    one id (the tiny tokenizer's bytes repeat), a baseline's fill and a
    silenced clip one id per vector."""
    model, inp = adapter_and_input(speech=True)
    inp = ChatInput(
        inp.chat, model, audio_unit=0.25, text_unit="token", text_baseline=text_baseline,
        audio_baseline=audio_baseline,
    )  # fmt: skip
    n = inp.n_itp_features
    coalitions = torch.randint(0, 2, (40, n), generator=torch.Generator().manual_seed(5))
    coalitions[:8] = coalitions[0]  # alike
    coalitions[:8, torch.arange(8) + n - 8] = 0  # then one feature near the end each
    masked = inp.to_model_input(coalitions)
    response = model.response(torch.tensor([300, 301, 302]))
    calls, handle = _packed_calls(model)
    for prefix in (None, model.prefill(inp.to_model_input())):
        by_ids = model.score_masked(masked, response, prefix)
        pushed = calls[-1]
        rows = model._coalition_rows(masked, prefix)  # the vectors, as generation reads them
        by_vectors = model.score_rows(rows, response, prefix)
        assert torch.equal(by_ids, by_vectors) and calls[-1] == pushed
    # the table: the chat's vectors, then each fill once and each silenced clip once
    audio = inp.encoded.clip >= 0
    silenced = {tuple(p[audio].tolist()) for p in masked.present if not p[audio].all()}
    extra = {"drop": 0, "replace": 1}[text_baseline]
    extra += {"drop": 0, "embedding": 1, "silence": len(silenced) * int(audio.sum())}[
        audio_baseline
    ]
    _, table = model._masked_ids(masked)
    assert len(table) == len(inp.encoded.state["embeds"]) + extra
    handle.remove()
