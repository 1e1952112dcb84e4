"""The HTML report, checked in a real headless Chromium (Playwright)."""

import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from captum.attr import FeatureAblation

from captum_mllm import (
    Chat,
    ChatInput,
    LFM2AudioAdapter,
    MultimodalLLMAttribution,
    MultimodalLLMAttributionResult,
)
from captum_mllm.errors import InvalidOptionError
from captum_mllm.testing import speech_like, tiny_lfm2_audio
from captum_mllm.viz.report import FRAME_HEIGHT

HOSTILE = 'Look <script>window.pwned = 1</script> here "><img src=x onerror="window.pwned = 2">'
SCREENSHOT = Path(__file__).parents[1] / "outputs" / "report.png"


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        reason = "no chromium: apt-get install chromium (make setup does)"
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI on this machine must run the browser checks
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def page():
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=_chromium(),
            args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required",
                  "--disable-background-networking", "--disable-component-update"],
        )  # fmt: skip
        yield browser.new_page()
        browser.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    lfm = LFM2AudioAdapter(*tiny_lfm2_audio())
    chat = Chat().system("Be brief.").user(HOSTILE, audio=speech_like(1.5), sample_rate=16000)
    inp = ChatInput(chat, lfm, audio_unit=0.5)
    res = MultimodalLLMAttribution(FeatureAblation(lfm), lfm).attribute(
        inp, gen_args={"max_new_tokens": 5}, perturbations_per_eval=32
    )
    folder = tmp_path_factory.mktemp("report")
    saved = MultimodalLLMAttributionResult.load(res.save(folder / "res.json"))  # from disk
    return res, saved.save_html(folder / "report.html")


def test_the_report_loads_plays_switches_and_escapes(page, report):
    res, path = report
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    assert errors == []
    # one element per feature: a span per text feature, a strip per audio feature
    shown = page.eval_on_selector_all("span.feature, rect.seg", "els => els.map(e => e.dataset.f)")
    assert sorted(map(int, shown)) == list(range(len(res.input_tokens)))
    # hostile text is shown as text and never runs
    assert page.evaluate("window.pwned") is None
    assert "<script>window.pwned = 1</script>" in page.inner_text("#chat")
    assert page.locator("img").count() == 0
    # each output token is offered with its probability under the whole input
    options = page.eval_on_selector_all("#row option", "els => els.map(e => e.textContent)")
    assert options[1:] == [
        f"token {i}: {label} (p = {float(p):.2g})"
        for i, (label, p) in enumerate(zip(res.output_tokens, res.output_probs, strict=True))
    ]
    # the selector switches to one output token's row
    before = page.eval_on_selector_all("span.feature", "els => els.map(e => e.style.background)")
    page.select_option("#row", "2")
    after = page.eval_on_selector_all("span.feature", "els => els.map(e => e.style.background)")
    assert before != after
    first = page.locator("span.feature").first
    label, value = first.get_attribute("title").rsplit(": ", 1)
    feature = int(first.get_attribute("data-f"))
    assert label == res.input_tokens[feature]
    assert float(value) == pytest.approx(float(res.token_attr[1, feature]), abs=1e-3)
    # a segment plays from its start and stops at its end
    button = page.locator("button.play").nth(1)
    start = float(button.get_attribute("data-start"))
    button.click()
    page.wait_for_timeout(400)
    now = page.evaluate("document.getElementById('clip-0').currentTime")
    assert now > start
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_the_features_are_listed_largest_first_for_the_row_shown(page, report, tmp_path):
    """The page told values by colour alone (and on hover): nothing in print,
    on a touch screen, or to a reader who cannot tell red from green. A table
    lists them, largest |value| first, for the row the selector shows."""
    res, path = report
    page.goto(path.as_uri())
    page.wait_for_load_state("load")

    def table():
        return page.eval_on_selector_all(
            "#ranked tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
        )

    for row, values in ((None, res.seq_attr), ("3", res.token_attr[2])):
        if row is not None:
            page.select_option("#row", row)
        order = sorted(range(len(values)), key=lambda f: (-abs(float(values[f])), f))
        expected = [[str(i + 1), res.input_tokens[f], f"{res.features[f].turn} user",
                     f"{float(values[f]):.3f}"] for i, f in enumerate(order)]  # fmt: skip
        assert table() == expected
    assert any(HOSTILE.split()[1] in label for _, label, *_ in table())  # as text
    res = MultimodalLLMAttributionResult(
        input_tokens=["a", "b", "c"], output_tokens=["x"],
        seq_attr=torch.tensor([0.25, float("nan"), -0.5]),
        seq_attr_stderr=torch.tensor([float("inf"), 0.0625, 0.125]),
    )  # fmt: skip
    page.goto(res.save_html(tmp_path / "r.html").as_uri())
    page.wait_for_load_state("load")
    assert table() == [["1", "c", "-0.500", "0.125"], ["2", "a", "0.250", "inf"],
                       ["3", "b", "nan", "0.063"]]  # fmt: skip


def test_results_shown_in_one_notebook_keep_their_own_pages(page, report, tmp_path):
    """A notebook puts each output's HTML into its own page: the report's
    styles restyled the whole notebook, and a second result's script failed on
    the first's names, leaving it uncoloured. Two results, and the hostile
    chat's, as a notebook holds them."""
    res, _ = report
    a = MultimodalLLMAttributionResult(
        input_tokens=["alpha", "beta"], output_tokens=["x"], seq_attr=torch.tensor([1.0, -1.0])
    )
    b = MultimodalLLMAttributionResult(
        input_tokens=[f"w{i}" for i in range(40)], output_tokens=["y"],
        seq_attr=torch.linspace(-5, 5, 40),
    )  # fmt: skip
    cells = "".join(f'<div class="output">{r._repr_html_()}</div>' for r in (a, b, res))
    notebook = tmp_path / "notebook.html"
    notebook.write_text(f"<!DOCTYPE html><html><body>{cells}</body></html>", encoding="utf-8")
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(notebook.as_uri())
    page.wait_for_load_state("load")
    assert errors == []
    assert page.evaluate("getComputedStyle(document.body).maxWidth") == "none"
    assert page.locator("span.feature").count() == 0  # each result in its own page
    frames = [page.frame_locator("iframe").nth(i) for i in range(3)]
    for frame, r in zip(frames, (a, b, res), strict=True):
        titles = frame.locator("span.feature, rect.seg").evaluate_all(
            "els => els.map(e => e.dataset.f + ' ' + e.getAttribute('title'))"
        )
        values = r.seq_attr.tolist()
        assert sorted(titles, key=lambda t: int(t.split()[0])) == [
            f"{f} {label}: {values[f]:.3f}" for f, label in enumerate(r.input_tokens)
        ]
        assert frame.locator("#ranked tbody tr").count() == len(values)
    fits = [frames[i].locator("html").evaluate("e => e.scrollHeight") for i in range(3)]
    for _ in range(50):  # each frame grows or shrinks to its page's height once told it
        heights = page.eval_on_selector_all("iframe", "els => els.map(e => e.offsetHeight)")
        if heights == fits:
            break
        page.wait_for_timeout(100)
    assert heights == fits and max(fits) > FRAME_HEIGHT
    assert page.evaluate("window.pwned") is None
    assert frames[2].locator("body").evaluate("() => window.pwned") is None
    assert "<script>window.pwned" not in res._repr_html_()  # escaped into the frame


def test_a_notebook_viewer_without_frames_or_scripts_shows_the_answer_and_largest_features(
    report,
):
    """GitHub's notebook view, nbconvert's PDF and untrusted outputs drop
    frames and scripts: a result showed nothing there. A line of text before
    the frame names the answer and the five largest features, escaped."""
    import re
    from html.parser import HTMLParser

    class Text(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.text = [], ""

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)

        def handle_data(self, data):
            self.text += data

    for res in (report[0], MultimodalLLMAttributionResult(
        input_tokens=["עברית", "beta", "\u202eevil", "d", "e", "f"], output_tokens=["x", "y"],
        seq_attr=torch.tensor([0.5, -2.0, 1.0, 0.01, 0.02, -0.03]), response_text="x y",
    )):  # fmt: skip
        shown = re.sub(
            r"<script>.*?</script>|<iframe .*?</iframe>", "", res._repr_html_(), flags=re.S
        )
        text = Text()
        text.feed(shown)
        assert text.tags == ["p"]  # the hostile chat's markup stays text
        top = res.top_features(5)
        assert text.text.strip().startswith(f"Attribution to the answer {res.response_text!r}")
        largest = text.text.split("largest: ")[1]
        expected = [f"{f} {v:+.3g}" for f, v in zip(top["feature"], top["seq_attr"], strict=True)]
        assert largest.strip() == ", ".join(expected).replace("\u202e", "⟨RLO⟩")


def test_summaries(report):
    res, _ = report
    shares = res.modality_share()
    assert set(shares) == {"text", "audio_in"} and abs(sum(shares.values()) - 1) < 1e-6
    assert abs(sum(res.modality_share(target_token_pos=0).values()) - 1) < 1e-6
    nothing = res.normalized("identity")
    nothing.seq_attr = torch.zeros_like(nothing.seq_attr)  # it was an even split, 0.5 each
    assert all(math.isnan(v) for v in nothing.modality_share().values())
    turns = res.by_turn()
    torch.testing.assert_close(
        torch.tensor(float(turns.seq_attr.sum())),
        torch.tensor(float(res.seq_attr.sum())),
        atol=1e-5,
        rtol=0,
    )
    assert list(res.by_role().role) == ["user"]
    top = res.top_features(3)
    assert len(top) == 3 and top.seq_attr.abs().is_monotonic_decreasing
    with pytest.raises(InvalidOptionError):  # pandas read -1 as "all but the last"
        res.top_features(-1)
    with pytest.raises(InvalidOptionError, match="out of range"):  # an IndexError came through
        res.modality_share(target_token_pos=len(res.output_tokens))
    for bad in (True, 1.5, (1, 1), (0, 1, 2)):  # a bool or float indexed another shape
        with pytest.raises(InvalidOptionError, match="out of range"):
            res.modality_share(target_token_pos=bad)
    summed = res.token_attr[:2].sum(dim=0).abs()
    audio = [f.modality == "audio_in" for f in res.features]
    assert res.modality_share(target_token_pos=(0, 2))["audio_in"] == pytest.approx(
        float(summed[audio].sum() / summed.sum()), rel=1e-6
    )
    frame = res.to_dataframe()
    audio = frame[frame.modality == "audio_in"]
    assert (audio.end_s > audio.start_s).all() and frame[
        frame.modality == "text"
    ].start_s.isna().all()


def test_plot_chat_attr_draws_one_patch_per_feature_in_its_colour(report):
    import matplotlib
    from matplotlib.colors import Normalize

    matplotlib.use("Agg")
    res, _ = report
    with pytest.raises(InvalidOptionError):  # each word was drawn on a line of its own
        res.plot_chat_attr(width=0)
    for row in (None, 1):
        fig, ax = res.plot_chat_attr(target_token_pos=row)
        patches = {p.get_gid(): p for p in ax.patches if p.get_gid()}
        values = res.seq_attr if row is None else res.token_attr[row]
        assert sorted(patches) == sorted(f"feature-{i}" for i in range(len(values)))
        bound = float(values.abs().max())
        cmap = res._get_plot_color_map()
        for i, value in enumerate(values.tolist()):
            expected = cmap(Normalize(-bound, bound)(value))
            assert patches[f"feature-{i}"].get_facecolor() == pytest.approx(expected)
        matplotlib.pyplot.close(fig)


def test_the_report_carries_standard_errors_and_needs_no_chat():
    res = MultimodalLLMAttributionResult(
        input_tokens=["a", "b"], output_tokens=["x"], seq_attr=torch.tensor([0.5, -0.25]),
        seq_attr_stderr=torch.tensor([0.125, 0.0625]),
    )  # fmt: skip
    html = res.to_html()
    data = html.split('id="data">')[1].split("</script>")[0]
    assert '"errors": [[0.125, 0.0625]]' in data
    res.seq_attr_stderr = torch.zeros(2)  # an exact method's
    assert '"errors": null' in res.to_html()
    assert html.count('class="feature"') == 2  # a Captum input: its features in order


def test_infinite_errors_and_nan_values_keep_the_report_working(page, tmp_path):
    """JSON has no infinities: json.dumps wrote Infinity, and the page's
    JSON.parse threw, leaving every feature uncoloured (an estimate from one
    pair of orders has an infinite standard error; a model may give NaN)."""
    res = MultimodalLLMAttributionResult(
        input_tokens=["a", "b", "c"], output_tokens=["x"],
        seq_attr=torch.tensor([0.5, float("nan"), -0.25]),
        seq_attr_stderr=torch.tensor([float("inf"), 0.0625, 0.125]),
    )  # fmt: skip
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(res.save_html(tmp_path / "r.html").as_uri())
    page.wait_for_load_state("load")
    assert errors == []
    titles = page.eval_on_selector_all("span.feature", "els => els.map(e => e.title)")
    assert titles == ["a: 0.500 \u00b1 inf", "b: nan \u00b1 0.063", "c: -0.250 \u00b1 0.125"]
    colours = page.eval_on_selector_all("span.feature", "els => els.map(e => e.style.background)")
    assert colours[0] != colours[2] and colours[1] == "rgb(255, 255, 255)"


def test_the_page_embeds_each_clip_losslessly_at_about_half_a_wavs_size(tmp_path):
    """Clips were embedded as WAV: a notebook keeps the page in its outputs, and
    a minute of speech took 2.6 MB of it."""
    import base64
    import io
    import re

    import soundfile as sf

    from captum_mllm.audio import load_audio

    wave, rate, _ = load_audio(Path(__file__).parents[1] / "captum_mllm" / "data" / "question.wav")
    lfm = LFM2AudioAdapter(*tiny_lfm2_audio())
    inp = ChatInput(Chat().user("Hi", audio=wave, sample_rate=rate), lfm, audio_unit=0.5)
    res = MultimodalLLMAttribution(FeatureAblation(lfm), lfm).attribute(inp, target="Yes")
    page = res.save_html(tmp_path / "report.html").read_text()
    (data,) = re.findall(r'src="data:audio/flac;base64,([^"]+)"', page)
    embedded, embedded_rate = sf.read(io.BytesIO(base64.b64decode(data)), dtype="int16")
    pcm = io.BytesIO()
    sf.write(pcm, wave.numpy().reshape(-1), rate, format="WAV", subtype="PCM_16")
    expected, _ = sf.read(io.BytesIO(pcm.getvalue()), dtype="int16")
    assert embedded_rate == rate and (embedded == expected).all()  # the 16-bit clip, lossless
    assert len(base64.b64decode(data)) < 0.6 * len(pcm.getvalue())


def test_a_right_to_left_turn_reads_right_to_left(page, tmp_path):
    """A Hebrew or Arabic turn was laid out left to right: its question mark
    stood right of the last word, where Hebrew reads it first, and the lines
    began at the left margin."""
    from captum_mllm.testing import tiny_hf_adapter

    llama = tiny_hf_adapter()
    chat = Chat().user("מה בירת צרפת?").assistant("פריז.")
    res = MultimodalLLMAttribution(FeatureAblation(llama), llama).attribute(ChatInput(chat, llama))
    page.goto(res.save_html(tmp_path / "r.html").as_uri())
    page.wait_for_load_state("load")
    boxes = page.evaluate(
        """() => [...document.querySelectorAll('#chat .text')[0].childNodes].map(e => {
            const r = document.createRange(); r.selectNodeContents(e);
            const b = r.getBoundingClientRect();
            return [e.textContent.trim(), b.left, b.right]; })"""
    )
    x = {text: (left, right) for text, left, right in boxes}
    assert list(x) == ["מה", "בירת", "צרפת", "?"]
    assert x["מה"][0] > x["בירת"][0] > x["צרפת"][0] > x["?"][0]  # read from the right
    right = page.evaluate("document.querySelector('#chat .text').getBoundingClientRect().right")
    assert x["מה"][1] == pytest.approx(right, abs=2)  # and begun at the right margin
    direction = "e => getComputedStyle(e).direction"
    assert page.eval_on_selector("#response", direction) == "rtl"  # the answer too
    assert page.eval_on_selector_all("table.meta td", f"els => els.map({direction})")[1] == "ltr"


def test_bidirectional_controls_are_shown_not_obeyed(page, tmp_path):
    """A right-to-left override in a prompt ("Trojan Source") reversed the rest
    of its paragraph in the report: the words showed in another order than
    the model read them. Each control is shown by name instead."""
    from captum_mllm.testing import tiny_hf_adapter

    llama = tiny_hf_adapter()
    chat = (
        Chat().user("Please grant access \u202eresu nimda\u202c to me").assistant("ok \u202edone")
    )
    res = MultimodalLLMAttribution(FeatureAblation(llama), llama).attribute(ChatInput(chat, llama))
    page.goto(res.save_html(tmp_path / "r.html").as_uri())
    page.wait_for_load_state("load")
    left = page.eval_on_selector_all(
        "span.feature",
        """els => Object.fromEntries(els.map(e => {
            const r = document.createRange(); r.selectNodeContents(e);
            return [e.textContent.trim(), r.getBoundingClientRect().left]; }))""",
    )
    assert left["⟨RLO⟩resu"] < left["nimda"] < left["⟨PDF⟩ to"]  # in the order read
    shown = page.inner_text("body")
    assert "\u202e" not in shown and "\u202c" not in shown
    assert "ok ⟨RLO⟩done" in page.inner_text("#response")
