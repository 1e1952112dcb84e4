"""Gradient and attention attributions on ChatInput features."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from captum.attr import (
    IntegratedGradients,
    LayerGradientShap,
    LayerGradientXActivation,
    LayerIntegratedGradients,
    LLMGradientAttribution,
    Saliency,
    TextTokenInput,
)
from conftest import alone_and_in_threads

from captum_mllm import Chat, ChatInput, LFM2AudioAdapter, MultimodalLLMAttributionResult
from captum_mllm.agreement import compare
from captum_mllm.attention import AttentionAttribution, aggregate_attention
from captum_mllm.errors import (
    InvalidBaselineError,
    InvalidModelError,
    InvalidOptionError,
    UnsupportedInputError,
)
from captum_mllm.gradient import MultimodalLLMGradientAttribution
from captum_mllm.testing import speech_like, tiny_hf_adapter, tiny_lfm2_audio

TARGET = "I am a cat."


@pytest.fixture(scope="module")
def llama():
    return tiny_hf_adapter()


@pytest.fixture(scope="module")
def words(llama):
    chat = Chat().system("Be brief.").user("Who are you, my friend?")
    return ChatInput(chat, llama, text_unit="word")


def _stock_on_same_tokens(model, inp, target_ids, **kwargs):
    """Captum's LLMGradientAttribution on a TextTokenInput of the chat's own
    token ids, with exactly the feature positions interpretable."""
    ids = inp.encoded.input_ids[None]
    mask = (inp.feature_of_position >= 0)[None]
    captum_inp = TextTokenInput("x", model.tokenizer)
    captum_inp.inp_tensor, captum_inp.itp_mask = ids, mask
    captum_inp.itp_tensor = ids[mask][None]
    captum_inp.values = [str(i) for i in captum_inp.itp_tensor[0].tolist()]
    captum_inp.n_itp_features = len(captum_inp.values)
    layer = model.model.get_input_embeddings()
    stock = LLMGradientAttribution(LayerIntegratedGradients(model.model, layer), model.tokenizer)
    res = stock.attribute(captum_inp, target=target_ids, **kwargs)
    owner = inp.feature_of_position[inp.feature_of_position >= 0]
    summed = torch.zeros(len(res.token_attr), inp.n_itp_features)
    return summed.index_add_(1, owner, res.token_attr.float())


@pytest.mark.filterwarnings("ignore:integrated gradients' attributions")  # few steps: parity
def test_equals_captum_summed_over_each_words_tokens(llama, words):
    lig = LayerIntegratedGradients(llama, llama.model.get_input_embeddings())
    res = MultimodalLLMGradientAttribution(lig, llama).attribute(
        words, target=TARGET, n_steps=32, baselines=0
    )
    assert res.token_attr.shape == (len(res.output_tokens), words.n_itp_features)
    stock = _stock_on_same_tokens(llama, words, res.target_ids, n_steps=32)
    torch.testing.assert_close(res.token_attr, stock, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res.seq_attr, stock.sum(0), atol=1e-4, rtol=1e-4)
    assert res.features == words.features and res.input_tokens == list(words.values)
    for token in (-1, 10**9):  # an IndexError and an OverflowError came through
        with pytest.raises(InvalidBaselineError, match="not a token id"):
            MultimodalLLMGradientAttribution(lig, llama).attribute(words, baselines=token)
    # Captum's assertion (gone under python -O), a TypeError deep inside, and
    # ours replaced by the caller's forward arguments: a missing-argument TypeError
    for bad in ({"n_steps": 0}, {"n_steps": 2.5}, {"additional_forward_args": (1,)}):
        with pytest.raises(InvalidOptionError, match="n_steps must be|the attribution's own"):
            MultimodalLLMGradientAttribution(lig, llama).attribute(words, target=TARGET, **bad)


def test_integrated_gradients_is_complete(llama, words):
    ig = IntegratedGradients(llama)
    res = MultimodalLLMGradientAttribution(ig, llama).attribute(
        words, target=TARGET, n_steps=500, internal_batch_size=100
    )
    assert res.provenance["completeness_gap"] < 0.01
    # by hand for the first token: the feature sum is f(x) - f(zero features)
    embeds = llama.input_embeddings(words.encoded)[None]
    base = embeds.clone()
    base[0, words.feature_of_position >= 0] = 0
    response = llama.text_response(TARGET)
    with torch.no_grad():
        span = llama.next_token_log_probs(embeds, response, 0) - llama.next_token_log_probs(
            base, response, 0
        )
    assert abs(float(res.token_attr[0].sum() - span)) < 0.01 * abs(float(span)) + 1e-4
    # Too few steps for the path: the sums miss the change, and a warning says so.
    with pytest.warns(UserWarning, match="raise n_steps") as said:
        few = MultimodalLLMGradientAttribution(ig, llama).attribute(words, target=TARGET, n_steps=8)
    assert few.provenance["completeness_gap"] > 0.05 and said[0].filename == __file__


@pytest.mark.filterwarnings("ignore:integrated gradients' attributions")  # few steps: parity
def test_gradients_run_inside_the_callers_inference_mode(llama, words):
    """Inside ``torch.inference_mode()`` (a notebook cell's, with an input
    built there too), integrated gradients raised autograd's "element 0 of
    tensors does not require grad"; under ``no_grad`` it already ran."""
    ig = MultimodalLLMGradientAttribution(IntegratedGradients(llama), llama)
    expected = ig.attribute(words, target=TARGET, n_steps=8).token_attr
    with torch.inference_mode():
        inp = ChatInput(words.chat, llama)
        got = ig.attribute(inp, target=TARGET, n_steps=8).token_attr
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_saliency_norm_and_layer_methods(llama, words, tmp_path):
    sal = MultimodalLLMGradientAttribution(Saliency(llama), llama, reduce="norm")
    res = sal.attribute(words, target=TARGET)
    assert (res.token_attr >= 0).all() and res.token_attr.abs().sum() > 0
    with pytest.raises(InvalidBaselineError, match="takes no baselines"):  # it went unread
        sal.attribute(words, target=TARGET, baselines=5)
    gxa = LayerGradientXActivation(llama, llama.model.get_input_embeddings())
    res2 = MultimodalLLMGradientAttribution(gxa, llama).attribute(words, target=TARGET)
    res2.save(tmp_path / "r.json")
    back = MultimodalLLMAttributionResult.load(tmp_path / "r.json")
    torch.testing.assert_close(torch.as_tensor(back.token_attr), res2.token_attr)
    with pytest.raises(InvalidOptionError):
        MultimodalLLMGradientAttribution(Saliency(llama), llama, reduce="mean")
    with pytest.raises(UnsupportedInputError, match=r"Saliency\(model\)"):  # "type is not ..."
        MultimodalLLMGradientAttribution(Saliency, llama)
    other = tiny_hf_adapter(seed=1)  # its layer hooked while the adapter's model ran
    with pytest.raises(InvalidModelError, match="another model"):
        MultimodalLLMGradientAttribution(
            LayerGradientXActivation(other, other.model.get_input_embeddings()), llama
        )


@pytest.mark.filterwarnings("ignore:integrated gradients' attributions")  # few steps: parity
def test_a_noise_tunnel_smooths_a_supported_method(llama, words):
    """Captum's NoiseTunnel (SmoothGrad) around Saliency or integrated gradients
    was refused. Without noise it is the method itself; with noise, seeded by
    torch, the mean of the method on noisy embeddings."""
    from captum.attr import NoiseTunnel

    def run(method, **kwargs):
        attr = MultimodalLLMGradientAttribution(method, llama)
        return attr.attribute(words, target=TARGET, **kwargs).token_attr

    plain = run(Saliency(llama))
    torch.testing.assert_close(run(NoiseTunnel(Saliency(llama)), stdevs=0.0, nt_samples=3), plain)
    ig = run(IntegratedGradients(llama), n_steps=8)
    smooth_ig = run(NoiseTunnel(IntegratedGradients(llama)), stdevs=0.0, nt_samples=2, n_steps=8)
    torch.testing.assert_close(smooth_ig, ig)  # the baselines reach the method inside
    torch.manual_seed(0)
    noisy = run(NoiseTunnel(Saliency(llama)), stdevs=0.05, nt_samples=4)
    torch.manual_seed(0)
    again = run(NoiseTunnel(Saliency(llama)), stdevs=0.05, nt_samples=4)
    torch.testing.assert_close(noisy, again)
    assert not torch.allclose(noisy, plain, atol=1e-3)
    res = MultimodalLLMGradientAttribution(NoiseTunnel(Saliency(llama)), llama).attribute(
        words, target=TARGET, stdevs=0.0
    )
    assert res.provenance["method"] == "NoiseTunnel(Saliency)"
    from captum.attr import FeatureAblation

    with pytest.raises(UnsupportedInputError, match="FeatureAblation is not supported"):
        MultimodalLLMGradientAttribution(NoiseTunnel(FeatureAblation(llama)), llama)
    with pytest.raises(UnsupportedInputError, match="takes a ChatInput"):
        tunnel = MultimodalLLMGradientAttribution(NoiseTunnel(Saliency(llama)), llama)
        tunnel.attribute(TextTokenInput("Who are you?", llama.tokenizer), target=TARGET)
    # A misspelt argument (the tunnel's own, or the method's) raised after the answer
    calls = llama.n_forward_calls
    for method, typo in ((NoiseTunnel(Saliency(llama)), "nt_sample"),
                         (IntegratedGradients(llama), "n_step")):  # fmt: skip
        with pytest.raises(TypeError, match=rf"\['{typo}'\]"):
            MultimodalLLMGradientAttribution(method, llama).attribute(words, **{typo: 2})
    assert llama.n_forward_calls == calls  # was generated


def test_a_seed_makes_what_a_gradient_method_draws_repeatable(llama, words):
    """NoiseTunnel's noise and GradientShap's baselines came from torch's
    global generator only (values changed with whatever ran before; the
    perturbation methods take ``seed=``). With ``seed=`` they are a function of
    it, kept in the provenance, and the caller's generator does not move."""
    from captum.attr import GradientShap, NoiseTunnel

    def run(method, **kwargs):
        attr = MultimodalLLMGradientAttribution(method, llama)
        return attr.attribute(words, target=TARGET, **kwargs)

    tunnel = {"stdevs": 0.05, "nt_samples": 4}
    state = torch.get_rng_state()
    first = run(NoiseTunnel(Saliency(llama)), seed=3, **tunnel)
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(5)  # the global generator moves between the runs
    again = run(NoiseTunnel(Saliency(llama)), seed=3, **tunnel)
    torch.testing.assert_close(again.token_attr, first.token_attr, rtol=0, atol=0)
    other = run(NoiseTunnel(Saliency(llama)), seed=4, **tunnel)
    assert not torch.allclose(other.token_attr, first.token_attr, atol=1e-4)
    assert first.provenance["method_args"]["seed"] == 3
    torch.manual_seed(3)  # the same draws as Captum's own under torch.manual_seed
    stock = run(NoiseTunnel(Saliency(llama)), **tunnel)
    torch.testing.assert_close(stock.token_attr, first.token_attr, rtol=0, atol=0)
    shap = [run(GradientShap(llama), seed=s, n_samples=3).token_attr for s in (1, 1, 2)]
    torch.testing.assert_close(shap[0], shap[1], rtol=0, atol=0)
    assert not torch.allclose(shap[0], shap[2], atol=1e-4)
    with pytest.raises(InvalidOptionError, match="seed"):
        run(Saliency(llama), seed=-1)


@pytest.mark.filterwarnings("ignore:integrated gradients' attributions")  # few steps: parity
def test_audio_features_get_gradients_that_follow_the_audio():
    lfm = LFM2AudioAdapter(*tiny_lfm2_audio())
    ig = IntegratedGradients(lfm)
    attr = MultimodalLLMGradientAttribution(ig, lfm)

    def run(audio, roles=("user",)):
        chat = Chat().system("Be brief.").user("What is it?", audio=audio, sample_rate=16000)
        inp = ChatInput(chat, lfm, audio_unit=0.5, roles=roles)
        return inp, attr.attribute(inp, target="yes", n_steps=16)

    inp, res = run(speech_like(1.5, seed=0))
    audio = [i for i, f in enumerate(inp.features) if f.modality == "audio_in"]
    assert audio and res.seq_attr[audio].abs().sum() > 0
    _, other = run(speech_like(1.5, seed=1))
    assert not torch.allclose(res.seq_attr[audio], other.seq_attr[audio])
    inp_sys, res_sys = run(speech_like(1.5, seed=0), roles=("system",))
    assert all(f.modality == "text" and f.role == "system" for f in inp_sys.features)
    assert res_sys.token_attr.shape[1] == inp_sys.n_itp_features


def test_attention_of_a_speech_model_reads_its_backbone_with_the_audio():
    """LFM2-Audio's backbone is a transformers model read from embeddings (the
    audio adapter's output at audio positions): AttentionAttribution refused it."""
    lfm = LFM2AudioAdapter(*tiny_lfm2_audio())
    method = AttentionAttribution(lfm)
    text = ChatInput(Chat().system("Be brief.").user("Tell me about the fox"), lfm)
    with pytest.warns(UserWarning, match="conv layers mix positions"):
        res = method.attribute(text, target="yes it is")
    # By hand: the backbone on the token embeddings of prompt and answer, eager
    answer = lfm.text_response("yes it is").ids[:, 0]  # text items: their token ids
    ids = torch.cat([text.encoded.input_ids, answer[:-1]])
    backbone = lfm.model.lfm
    before = backbone.config._attn_implementation
    backbone.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = backbone(inputs_embeds=backbone.embed_tokens(ids)[None], output_attentions=True)
    finally:
        backbone.set_attn_implementation(before)
    maps = [a[0].mean(0) for a in out.attentions if a is not None]
    n = len(text.encoded)
    rows = torch.stack(maps).mean(0)[n - 1 : n - 1 + len(answer), :n]
    owner = text.feature_of_position
    want = torch.zeros(len(answer), text.n_itp_features).index_add_(
        1, owner[owner >= 0], rows[:, owner >= 0]
    )
    torch.testing.assert_close(res.token_attr, want)
    # With speech, the audio features get the attention the audio draws
    chat = Chat().user("What is it?", audio=speech_like(1.5, seed=0), sample_rate=16000)
    spoken = ChatInput(chat, lfm, audio_unit=0.5)
    with pytest.warns(UserWarning, match="conv layers"):
        heard = method.attribute(spoken, target="yes")
    audio = [i for i, f in enumerate(spoken.features) if f.modality == "audio_in"]
    assert len(audio) == 3 and bool((heard.seq_attr[audio] > 0).all())
    assert float(heard.token_attr.sum(1).max()) <= 1 + 1e-5  # shares of softmax rows


def test_layers_with_other_head_counts_aggregate_per_layer(monkeypatch):
    """Inkling's sliding layers have 64 heads, its global ones 4: stacking the
    layers' weights raised a size error. A layer's heads are averaged first."""
    model = tiny_hf_adapter()
    inp = ChatInput(Chat().user("Who are you, my friend?"), model, text_unit="token")
    width = len(inp.encoded) + len(model.text_response(TARGET)) - 1
    gen = torch.Generator().manual_seed(0)
    ragged = [torch.rand(h, width, width, generator=gen).tril().softmax(-1) for h in (6, 2)]
    monkeypatch.setattr(AttentionAttribution, "attentions", lambda self, inp, response: ragged)
    mean = (ragged[0].mean(0) + ragged[1].mean(0)) / 2
    torch.testing.assert_close(aggregate_attention(ragged, "mean"), mean)
    top = torch.maximum(ragged[0].amax(0), ragged[1].amax(0))
    torch.testing.assert_close(aggregate_attention(ragged, "max"), top)
    res = AttentionAttribution(model, layers=[-1], heads=[0, 1]).attribute(inp, target=TARGET)
    n = len(inp.encoded)
    expected = ragged[1].mean(0)[n - 1 : n - 1 + len(res.output_tokens), :n]
    owner = inp.feature_of_position
    torch.testing.assert_close(res.token_attr, expected[:, owner >= 0])  # a token a feature
    with pytest.raises(InvalidOptionError, match="indices below 2"):  # the fewest heads
        AttentionAttribution(model, heads=[3]).attribute(inp, target=TARGET)


def test_rollout_on_one_layer_by_hand():
    model = tiny_hf_adapter(num_layers=1)
    inp = ChatInput(Chat().user("Who are you, my friend?"), model, text_unit="token")
    method = AttentionAttribution(model, aggregate="rollout")
    res = method.attribute(inp, target=TARGET)
    response = model.text_response(TARGET)
    att = method.attentions(inp, response)  # one layer's (heads, W, W)
    assert len(att) == 1
    a = 0.5 * att[0].mean(0) + 0.5 * torch.eye(att[0].shape[-1])
    a = a / a.sum(-1, keepdim=True)  # one layer: the rollout is this matrix
    n = len(inp.encoded)
    owner = inp.feature_of_position
    for t in range(len(response)):
        for f in range(inp.n_itp_features):
            expected = a[n - 1 + t, :n][owner == f].sum()
            assert abs(float(res.token_attr[t, f] - expected)) < 1e-5
    # rows of attention sum to one, so "mean" gives each token at most 1 in total
    mean = AttentionAttribution(model).attribute(inp, target=TARGET)
    assert (mean.token_attr.sum(1) <= 1 + 1e-5).all()
    assert torch.allclose(aggregate_attention(att, "max"), att[0].amax(0))
    last = AttentionAttribution(model, layers=[-1], heads=[0, -1]).attribute(inp, target=TARGET)
    same = AttentionAttribution(model, layers=[0], heads=[0, 3]).attribute(inp, target=TARGET)
    torch.testing.assert_close(last.token_attr, same.token_attr)  # one layer: -1 is 0
    # Layers given top down roll out bottom up, as given in order (it multiplied
    # them top down); a repeated head counts once.
    deep = tiny_hf_adapter(num_layers=3)
    deep_inp = ChatInput(Chat().user("Who are you, my friend?"), deep)
    up = AttentionAttribution(deep, "rollout", layers=[0, 2]).attribute(deep_inp, target=TARGET)
    down = AttentionAttribution(deep, "rollout", layers=[2, 0, -1]).attribute(
        deep_inp, target=TARGET
    )
    torch.testing.assert_close(down.token_attr, up.token_attr)
    twice = AttentionAttribution(model, heads=[0, 0, 1]).attribute(inp, target=TARGET)
    once = AttentionAttribution(model, heads=[0, 1]).attribute(inp, target=TARGET)
    torch.testing.assert_close(twice.token_attr, once.token_attr)
    for bad in ({"layers": []}, {"layers": [1]}, {"heads": [4]}):  # NaN, then IndexErrors
        with pytest.raises(InvalidOptionError, match="non-empty list of indices"):
            AttentionAttribution(model, **bad).attribute(inp, target=TARGET)
    for bad in ({"layers": []}, {"heads": [0.5]}, {"heads": "0"}):  # known before any forward
        with pytest.raises(InvalidOptionError, match="non-empty list of indices"):
            AttentionAttribution(model, **bad)


def test_compare_rank_correlations(llama, words):
    sal = MultimodalLLMGradientAttribution(Saliency(llama), llama).attribute(words, target=TARGET)
    att = AttentionAttribution(llama).attribute(words, target=TARGET)
    table, (fig, ax) = compare(sal, att, sal, names=["saliency", "attention", "again"])
    assert table.loc["saliency", "again"] == pytest.approx(1.0)
    assert -1 <= table.loc["saliency", "attention"] <= 1 and fig is not None
    with pytest.raises(InvalidOptionError):
        compare(sal)
    # a list of results, as pandas' concat takes them, was "fewer than two results"
    assert compare([sal, att])[0].equals(compare(sal, att)[0])
    with pytest.raises(InvalidOptionError, match="2 names for 3 results"):
        compare(sal, att, sal, names=["saliency", "attention"])
    # Two runs of one method: rows that could not be told apart
    assert list(compare(sal, att, sal)[0].index) == [
        "Saliency (1)",
        "AttentionAttribution(mean)",
        "Saliency (2)",
    ]
    with pytest.raises(InvalidOptionError, match="names must differ"):
        compare(sal, att, names=["a", "a"])
    # as many features, but other ones: rows would pair words that differ
    other = ChatInput(Chat().user("Why is sky so blue?"), llama)
    assert other.n_itp_features == words.n_itp_features
    elsewhere = AttentionAttribution(llama).attribute(other, target=TARGET)
    with pytest.raises(InvalidOptionError, match="different features"):
        compare(sal, elsewhere)
    answer = AttentionAttribution(llama).attribute(words, target="I am a small model.")
    compare(sal, answer)  # the sequence rows pair up
    # A result that ranks nothing: NaN (pandas' corr too) and a warning naming it,
    # not scipy's warning about an unnamed input.
    flat = copy.copy(sal)
    flat.seq_attr = torch.zeros_like(sal.seq_attr)
    with pytest.warns(UserWarning, match=r"\['flat'\] give every feature the same") as seen:
        table, _ = compare(sal, flat, att, names=["saliency", "flat", "attention"])
    assert all("flat" in str(w.message) for w in seen)
    assert table.loc["flat"].isna().all() and table["flat"].isna().all()
    assert table.loc["saliency", "attention"] == pytest.approx(compare(sal, att)[0].iloc[0, 1])
    assert table.loc["saliency", "saliency"] == 1.0
    with pytest.raises(InvalidOptionError, match="different responses"):
        compare(sal, answer, target_token_pos=0)


def test_layer_gradient_shap_runs_on_the_embeddings(llama, words):
    torch.manual_seed(0)
    gs = LayerGradientShap(llama, llama.model.get_input_embeddings())
    res = MultimodalLLMGradientAttribution(gs, llama).attribute(words, target=TARGET, n_samples=4)
    assert res.token_attr.shape == (len(res.output_tokens), words.n_itp_features)
    assert torch.isfinite(res.token_attr).all() and res.token_attr.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:integrated gradients' attributions")  # 8 steps: cheap
def test_one_gradient_attribution_called_from_several_threads(llama):
    """A web server keeps one attribution object and calls it per request:
    a Layer method hooks that object's embeddings layer for the call, so two
    threads' calls read each other's hooks (an IndexError, a shape error).
    Calls on one object now take turns, each with its own values."""
    lig = LayerIntegratedGradients(llama, llama.model.get_input_embeddings())
    attr = MultimodalLLMGradientAttribution(lig, llama)
    chats = [Chat().user(q) for q in ("Who are you?", "Count to ten, please", "Why is it?")]

    def explain(i: int) -> torch.Tensor:
        return attr.attribute(ChatInput(chats[i], llama), target="It is so.", n_steps=8).seq_attr

    alone, rounds = alone_and_in_threads(explain, len(chats))
    for together in rounds:
        for i in range(len(chats)):
            assert not isinstance(together[i], Exception), together[i]
            assert torch.equal(together[i], alone[i])


@pytest.mark.parametrize("speech", [False, True])
def test_gradient_and_attention_results_carry_the_answers_probabilities(llama, speech):
    """``output_probs`` as the perturbation methods give it (checked against
    stock Captum's scoring there), at the cost of one more forward."""
    from captum.attr import FeatureAblation

    from captum_mllm import MultimodalLLMAttribution

    if speech:
        model = LFM2AudioAdapter(*tiny_lfm2_audio())
        chat = Chat().user("What is it?", audio=speech_like(1.0, seed=0), sample_rate=16000)
    else:
        model, chat = llama, Chat().system("Be brief.").user("Who are you, my friend?")
    inp = ChatInput(chat, model)
    want = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(inp, target=TARGET)
    gradient = MultimodalLLMGradientAttribution(Saliency(model), model)
    for method in (gradient, AttentionAttribution(model)):
        calls = model.thread_forward_calls()
        with warnings.catch_warnings():  # LFM2's conv layers mix positions without attention
            warnings.simplefilter("ignore")
            res = method.attribute(inp, target=TARGET)
        torch.testing.assert_close(res.output_probs, want.output_probs, rtol=1e-4, atol=1e-7)
        assert res.n_model_calls == model.thread_forward_calls() - calls  # that one counted
