"""ContrastiveTarget: why this answer rather than another."""

import copy

import pytest
import torch
from captum.attr import FeatureAblation, TextTemplateInput
from conftest import FALCON_TEMPLATE, adapter_and_input, brute_force_shapley, game

from captum_mllm import (
    Chat,
    ChatInput,
    ContrastiveTarget,
    LogProbTarget,
    MultimodalLLMAttribution,
    MultimodalLLMAttributionResult,
)
from captum_mllm.errors import InvalidContentError, TargetError
from captum_mllm.methods import ExactShapleyValues, LeverageKernelShap


@pytest.mark.parametrize("speech", [False, True])
def test_the_contrast_is_the_answer_less_the_foil(speech):
    """Exact Shapley of the contrast equals the brute-force Shapley values of
    the answer's log-probability less those of the foil's, scored afresh."""
    adapter, inp = adapter_and_input(speech)
    answer, foil = "Paris is the capital.", "Lyon is the capital."
    contrast = ContrastiveTarget(foil)
    res = MultimodalLLMAttribution(ExactShapleyValues(adapter), adapter, target=contrast).attribute(
        inp, target=answer, perturbations_per_eval=7
    )
    assert res.token_attr is None and res.output_probs is None
    n = inp.n_itp_features
    log_prob = LogProbTarget()
    ids = {t: adapter.answer_response(inp.encoded, t).ids for t in (answer, foil)}
    expected = (
        brute_force_shapley(game(log_prob, adapter, inp, ids[answer]), n)[0]
        - brute_force_shapley(game(log_prob, adapter, inp, ids[foil]), n)[0]
    )
    torch.testing.assert_close(res.seq_attr, expected, atol=1e-4, rtol=0)
    assert res.seq_attr.abs().max() > 1e-3
    assert res.n_unique_coalitions == 2**n
    assert res.provenance["target"] == {"class": "ContrastiveTarget", "foil": foil}
    # a sampler keeps efficiency on the contrast: v(all) - v(none)
    sampled = MultimodalLLMAttribution(
        LeverageKernelShap(adapter), adapter, target=contrast
    ).attribute(inp, target=answer, budget=4 * n, seed=0)
    value = game(contrast, adapter, inp, ids[answer])
    full, empty = value(torch.stack([torch.ones(n), torch.zeros(n)]))[:, 0]
    assert float(sampled.seq_attr.sum()) == pytest.approx(float(full - empty), abs=1e-4)


def test_the_foil_is_read_as_the_answer_is(model):
    """A template writing a space before a given answer (Falcon's "Falcon: ")
    reads the foil with it too: the contrast is then the difference of the two
    explanations with target= text, which read it so."""
    tokenizer = copy.deepcopy(model.tokenizer)  # shared: the other tests keep its template
    tokenizer.chat_template = FALCON_TEMPLATE
    from captum_mllm import HFCausalLMAdapter

    falcon = HFCausalLMAdapter(model.model, tokenizer)
    inp = ChatInput(Chat().user("Which city, my friend?"), falcon)

    def explain(answer, target=None):
        attr = MultimodalLLMAttribution(ExactShapleyValues(falcon), falcon, target=target)
        return attr.attribute(inp, target=answer)

    paris, lyon = explain("Paris."), explain("Lyon.")
    assert lyon.target_ids.tolist() != tokenizer("Lyon.", add_special_tokens=False)["input_ids"]
    both = explain("Paris.", ContrastiveTarget("Lyon."))
    torch.testing.assert_close(both.seq_attr, paris.seq_attr - lyon.seq_attr, atol=1e-5, rtol=0)
    by_ids = explain("Paris.", ContrastiveTarget(lyon.target_ids))  # ids name the same foil
    torch.testing.assert_close(by_ids.seq_attr, both.seq_attr, atol=1e-6, rtol=0)


def test_a_foil_that_cannot_be_weighed_is_refused(model, chat, tmp_path):
    inp = ChatInput(chat, model)
    for foil in ("", "  \n", 3):
        with pytest.raises(TargetError, match="foil"):
            ContrastiveTarget(foil)
    same = MultimodalLLMAttribution(FeatureAblation(model), model, target=ContrastiveTarget("Hi."))
    with pytest.raises(TargetError, match="is the explained answer itself"):
        same.attribute(inp, target="Hi.")
    end = MultimodalLLMAttribution(
        FeatureAblation(model), model, target=ContrastiveTarget("Hi.<|im_end|>")
    )
    with pytest.raises(InvalidContentError, match="the foil: .*control token .*give its ids"):
        end.attribute(inp, target="Hi.")  # read as the end token, as a target= text is refused
    template = TextTemplateInput("{} are you?", values=["Who"])  # Captum's, read alike
    with pytest.raises(TargetError, match="is the explained answer itself"):
        same.attribute(template, target="Hi.")
    # a generated answer is weighed too, and the result keeps its foil
    res = same.attribute(inp, gen_args={"max_new_tokens": 4})
    res.save(tmp_path)
    back = MultimodalLLMAttributionResult.load(tmp_path)
    assert back.provenance["target"]["foil"] == back.foil == "Hi."
    assert "rather than" in res.to_html() and "Hi." in res.to_html()
    assert "rather than &#x27;Hi.&#x27;" in back._repr_html_()  # the plots' title too
    plain = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(inp, target="Hi.")
    assert "rather than" not in plain.to_html() and plain.foil is None


@pytest.mark.filterwarnings("ignore:integrated gradients' attributions")  # 16 steps: few
def test_contrastive_gradients_differentiate_the_answer_less_the_foil(model, chat):
    """Yin & Neubig's contrastive gradients: integrated gradients of the
    contrast are the answer's less the foil's (a linear method), and the
    contrastive gradient norm is the norm of the contrast's gradient (an
    oracle from torch.autograd), not a difference of norms."""
    from captum.attr import IntegratedGradients, Saliency, TextTokenInput

    from captum_mllm import EmbeddingSimilarity, MultimodalLLMGradientAttribution

    inp = ChatInput(chat, model)
    answer, foil = "Paris is it.", "Lyon is it."
    contrast = ContrastiveTarget(foil)

    def ig(answer, value_fn=None):
        method = MultimodalLLMGradientAttribution(
            IntegratedGradients(model), model, target=value_fn
        )
        return method.attribute(inp, target=answer, n_steps=16)

    both = ig(answer, contrast)
    assert both.token_attr is None and both.foil == foil
    expected = ig(answer).seq_attr - ig(foil).seq_attr
    torch.testing.assert_close(both.seq_attr, expected, atol=1e-4, rtol=1e-4)
    sal = MultimodalLLMGradientAttribution(Saliency(model), model, reduce="norm", target=contrast)
    got = sal.attribute(inp, target=answer).seq_attr
    embeds = model.input_embeddings(inp.encoded)[None].detach().requires_grad_()
    ids = {t: model.answer_response(inp.encoded, t) for t in (answer, foil)}
    with torch.enable_grad():
        value = sum(
            model.next_token_log_probs(embeds, ids[text], t) * sign
            for text, sign in ((answer, 1), (foil, -1))
            for t in range(len(ids[text]))
        )
        (grad,) = torch.autograd.grad(value.sum(), embeds)
    owner = inp.feature_of_position
    oracle = torch.zeros(inp.n_itp_features).index_add_(
        0, owner[owner >= 0], grad[0].norm(dim=-1)[owner >= 0]
    )
    torch.testing.assert_close(got, oracle, atol=1e-5, rtol=1e-4)
    apart = MultimodalLLMGradientAttribution(Saliency(model), model, reduce="norm")
    norms = (
        apart.attribute(inp, target=answer).seq_attr - apart.attribute(inp, target=foil).seq_attr
    )
    assert not torch.allclose(got, norms, atol=1e-3)  # a norm of a difference, not the reverse
    with pytest.raises(TargetError, match="foil"):
        ig(foil, contrast)  # the answer itself
    with pytest.raises(Exception, match="contrastive gradient takes a ChatInput"):
        MultimodalLLMGradientAttribution(Saliency(model), model, target=contrast).attribute(
            TextTokenInput("Who are you?", model.tokenizer), target="Paris"
        )
    with pytest.raises(Exception, match="target= takes ContrastiveTarget"):
        MultimodalLLMGradientAttribution(Saliency(model), model, target=EmbeddingSimilarity())


@pytest.mark.filterwarnings("ignore:integrated gradients' attributions")  # 8 steps: few
def test_a_spoken_chats_contrastive_gradient_is_the_difference_too():
    from captum.attr import IntegratedGradients

    from captum_mllm import MultimodalLLMGradientAttribution

    adapter, inp = adapter_and_input(speech=True)

    def ig(answer, value_fn=None):
        method = MultimodalLLMGradientAttribution(
            IntegratedGradients(adapter), adapter, target=value_fn
        )
        return method.attribute(inp, target=answer, n_steps=8).seq_attr

    both = ig("Paris.", ContrastiveTarget("Rome."))
    torch.testing.assert_close(both, ig("Paris.") - ig("Rome."), atol=1e-4, rtol=1e-4)
    assert both.abs().max() > 1e-3


@pytest.mark.parametrize("speech", [False, True])
def test_a_whole_answer_is_scored_in_one_differentiable_forward(speech):
    """What a contrastive gradient differentiates: the whole answer's
    log-probability in one teacher-forced forward, equal in value and gradient
    to one forward a token (ModelAdapter's default)."""
    from captum_mllm import ModelAdapter

    adapter, inp = adapter_and_input(speech)
    response = adapter.answer_response(inp.encoded, "Paris is the capital.")
    grads, values, calls = [], [], []
    for score in (
        adapter.response_log_prob,
        lambda *a: ModelAdapter.response_log_prob(adapter, *a),
    ):
        embeds = adapter.input_embeddings(inp.encoded)[None].detach().requires_grad_()
        before = adapter.n_forward_calls
        with torch.enable_grad():
            value = score(embeds, response)
            (grad,) = torch.autograd.grad(value.sum(), embeds)
        calls.append(adapter.n_forward_calls - before)
        values.append(value.detach())
        grads.append(grad)
    assert calls == [1, len(response)] and len(response) > 1
    torch.testing.assert_close(values[0], values[1], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
