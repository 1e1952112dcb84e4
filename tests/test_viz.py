"""Plots: audio spans coloured by attribution, Captum's plots on mixed results."""

import matplotlib
import pytest
import torch
from captum.attr import FeatureAblation, ShapleyValueSampling
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.colors import Normalize
from matplotlib.patches import Rectangle

from captum_mllm import (
    Chat,
    ChatInput,
    EmbeddingSimilarity,
    LFM2AudioAdapter,
    MultimodalLLMAttribution,
    MultimodalLLMAttributionResult,
)
from captum_mllm.errors import PlotError
from captum_mllm.testing import speech_like, tiny_lfm2_audio

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def lfm():
    return LFM2AudioAdapter(*tiny_lfm2_audio())


@pytest.fixture(scope="module")
def result(lfm):
    chat = (
        Chat()
        .system("Be brief.")
        .user("What is it?", audio=speech_like(1.2), sample_rate=16000)
        .assistant("A sound.")
        .user("And this?", audio=speech_like(0.6, seed=1), sample_rate=16000)
    )
    inp = ChatInput(chat, lfm, audio_unit=0.3)
    torch.manual_seed(0)
    return MultimodalLLMAttribution(ShapleyValueSampling(lfm), lfm).attribute(
        inp, gen_args={"max_new_tokens": 4}, n_samples=4, perturbations_per_eval=32
    )


def spans(ax):
    """(label, x0, x1, rgb) of each shaded span."""
    out = []
    for patch in ax.patches:
        if isinstance(patch, Rectangle):  # matplotlib >= 3.9
            x0, x1 = patch.get_x(), patch.get_x() + patch.get_width()
        else:
            xs = patch.get_xy()[:, 0]
            x0, x1 = float(xs.min()), float(xs.max())
        out.append((patch.get_label(), x0, x1, tuple(patch.get_facecolor()[:3])))
    return out


@pytest.mark.parametrize("pos", [None, 2, (1, 3)])
def test_audio_spans_have_the_colour_of_their_attribution(result, pos):
    fig, (ax_wave, ax_mel) = result.plot_audio_attr(turn=3, target_token_pos=pos)
    if pos is None:
        attr = result.seq_attr
    elif isinstance(pos, int):
        attr = result.token_attr[pos]
    else:
        attr = result.token_attr[pos[0] : pos[1]].sum(0)
    feats = [(i, f) for i, f in enumerate(result.features) if f.clip == 1]
    assert len(feats) == 2  # 0.6 s in 0.3 s windows
    bound = attr[[i for i, _ in feats]].abs().max().item()
    cmap, norm = result._get_plot_color_map(), Normalize(-bound, bound)
    drawn = spans(ax_wave)
    assert len(drawn) == len(feats) and len(spans(ax_mel)) == len(feats)
    for (i, f), (label, x0, x1, rgb) in zip(feats, drawn, strict=True):
        assert label == f.label
        assert (x0, x1) == pytest.approx(f.time)
        assert rgb == pytest.approx(cmap(norm(attr[i].item()))[:3], abs=1e-6)
    matplotlib.pyplot.close(fig)


def test_the_audio_plot_names_what_it_attributes_above_its_span_labels(result):
    """plot_audio_attr had no title: with target_token_pos it coloured a clip by
    one output token's row without saying which."""
    tokens = result.output_tokens
    answer = result.response_text or " ".join(tokens)
    for pos, what in ((None, f"the answer {answer!r}"), (1, f"output token 1: {tokens[1]!r}")):
        fig, (ax_wave, _) = result.plot_audio_attr(turn=3, target_token_pos=pos)
        assert fig.get_suptitle() == f"Attribution to {what}"
        renderer = fig.canvas.get_renderer()
        fig.canvas.draw()
        title = fig._suptitle.get_window_extent(renderer)
        labels = [t.get_window_extent(renderer) for t in ax_wave.texts]
        assert labels and fig.bbox.contains(title.x0, title.y0) and title.y1 <= fig.bbox.y1
        assert all(b.y1 <= title.y0 and b.y1 <= fig.bbox.y1 for b in labels)
        matplotlib.pyplot.close(fig)


def test_clip_selection_and_errors(result, lfm):
    fig, (ax, _) = result.plot_audio_attr()  # first clip of the chat
    assert len(spans(ax)) == sum(f.clip == 0 for f in result.features) == 4
    fig2, (ax2, _) = result.plot_audio_attr(clip=1)
    assert [s[0] for s in spans(ax2)] == [f.label for f in result.features if f.clip == 1]
    with pytest.raises(PlotError):
        result.plot_audio_attr(turn=0)  # the system turn has no audio
    with pytest.raises(PlotError):
        result.plot_audio_attr(turn=9)
    with pytest.raises(PlotError):
        result.plot_audio_attr(clip=2)
    with pytest.raises(PlotError):
        result.plot_audio_attr(target_token_pos=4)
    with pytest.raises(PlotError):
        result.plot_audio_attr(target_token_pos=(2, 9))
    text_only = MultimodalLLMAttribution(FeatureAblation(lfm), lfm).attribute(
        ChatInput(Chat().user("Hi there"), lfm), target="ok"
    )
    with pytest.raises(PlotError):
        text_only.plot_audio_attr()
    chat = Chat().user("Hi", audio=speech_like(0.5), sample_rate=16000)
    sim = MultimodalLLMAttribution(
        FeatureAblation(lfm), lfm, target=EmbeddingSimilarity(gen_args={"max_new_tokens": 2})
    ).attribute(ChatInput(chat, lfm))
    sim.plot_audio_attr()
    with pytest.raises(PlotError):
        sim.plot_audio_attr(target_token_pos=0)  # no token_attr for similarity


def test_captum_plots_label_mixed_features(result):
    fig, ax = result.plot_token_attr()
    assert [t.get_text() for t in ax.get_xticklabels()] == result.input_tokens
    assert any(label.startswith("audio[") for label in result.input_tokens)
    fig, ax = result.plot_seq_attr()
    assert [t.get_text() for t in ax.get_xticklabels()] == result.input_tokens


def _drawn(plot, labels):
    """A result of random attributions to ``labels``, and the axes of its ``plot``, drawn."""
    res = MultimodalLLMAttributionResult(
        input_tokens=labels,
        output_tokens=["a", "b"],
        seq_attr=torch.randn(len(labels)),
        token_attr=torch.randn(2, len(labels)),
    )
    fig, ax = getattr(res, plot)()
    fig.canvas.draw()
    return res, ax


@pytest.mark.parametrize("plot", ["plot_seq_attr", "plot_token_attr"])
def test_sixty_long_labels_do_not_overlap(plot):
    labels = [f"audio[{i * 0.08:.2f}-{(i + 1) * 0.08:.2f}s]" for i in range(50)]
    labels += [f"♪word{i}" for i in range(10)]
    _, ax = _drawn(plot, labels)
    boxes = [t.get_window_extent() for t in ax.get_xticklabels()]
    assert len(boxes) == 60
    for a, b in zip(boxes, boxes[1:], strict=False):
        assert a.x1 <= b.x0 + 0.5  # left to right, no overlap


@pytest.mark.parametrize("plot", ["plot_seq_attr", "plot_token_attr"])
def test_sentence_labels_are_cut_and_the_result_keeps_them_whole(plot):
    """text_unit="sentence": an upright label of 60 characters took more room
    than the bars."""
    labels = ["Who are you?", "I am your friend and I like you a lot, really, every day."]
    res, ax = _drawn(plot, labels)
    shown = [t.get_text() for t in ax.get_xticklabels()]
    assert shown == ["Who are you?", "I am your friend and I like you…"]
    assert res.input_tokens == labels


def test_a_long_clip_keeps_a_sane_figure_and_labels_what_fits():
    from captum_mllm import ClipRef
    from captum_mllm.inputs import FeatureInfo

    n = 120  # a minute in 0.5 s features
    features = [
        FeatureInfo(f"w{i}", "audio_in", 0, "user", (i,), clip=0, time=(i * 0.5, i * 0.5 + 0.5))
        for i in range(n)
    ]
    values = torch.sin(torch.arange(n, dtype=torch.float))
    res = MultimodalLLMAttributionResult(
        input_tokens=[f.label for f in features], output_tokens=["x"], seq_attr=values,
        features=features, roles=["user"], clips=[ClipRef(0, 8000, torch.zeros(8000 * 60))],
    )  # fmt: skip
    fig, (ax_wave, _) = res.plot_audio_attr()
    assert fig.get_size_inches()[0] <= 16.0
    labels = [t.get_text() for t in ax_wave.texts]
    assert 0 < len(labels) <= 16 * 5
    top = {features[i].label for i in values.abs().argsort(descending=True)[: len(labels)].tolist()}
    assert set(labels) == top
    wide, _ = res.plot_audio_attr(figsize=(30.0, 4.0))
    assert tuple(wide.get_size_inches()) == (30.0, 4.0)


def test_many_features_keep_captums_plots_readable():
    n, t = 300, 6  # two and a half minutes of audio in 0.5 s features
    res = MultimodalLLMAttributionResult(
        input_tokens=[f"audio[{i / 2:.2f}-{i / 2 + 0.5:.2f}s]" for i in range(n)],
        output_tokens=[f"o{j}" for j in range(t)],
        seq_attr=torch.randn(n),
        token_attr=torch.randn(t, n),
    )
    for fig, ax in (res.plot_token_attr(), res.plot_seq_attr()):
        assert fig.get_size_inches()[0] <= 20.0  # Captum alone: 1.3 inches a feature
        shown = [label for label in ax.get_xticklabels() if label.get_visible()]
        assert 0 < len(shown) < n
        fig.canvas.draw()
        boxes = [label.get_window_extent() for label in shown]
        assert all(a.x1 <= b.x0 + 1 for a, b in zip(boxes, boxes[1:], strict=False))  # no overlap
    fig, _ = res.plot_token_attr(figsize=(40.0, 6.0))
    assert tuple(fig.get_size_inches()) == (40.0, 6.0)


@pytest.mark.parametrize("words, tokens", [(8, 3), (23, 40), (80, 100)])
def test_heatmap_values_fit_their_cells_and_output_labels_do_not_overlap(words, tokens):
    """Captum writes each value at 10 points whatever the cell's size: 100 output
    tokens by 80 words drew them over each other and over the colours."""
    res = MultimodalLLMAttributionResult(
        input_tokens=[f"word{i}" for i in range(words)],
        output_tokens=[f"tok{j}" for j in range(tokens)],
        seq_attr=torch.randn(words),
        token_attr=torch.randn(tokens, words),
    )
    fig, ax = res.plot_token_attr()
    fig.canvas.draw()
    grid = ax.get_window_extent()
    cell_w, cell_h = grid.width / words, grid.height / tokens
    for text in ax.texts:
        box = text.get_window_extent()
        assert box.width < cell_w and box.height < cell_h
        assert text.get_fontsize() >= 5.0
    if words * tokens < 100:  # room enough: every value, at Captum's size
        assert len(ax.texts) == words * tokens
        assert {t.get_fontsize() for t in ax.texts} == {10.0}
    shown = [label.get_window_extent() for label in ax.get_yticklabels() if label.get_visible()]
    assert 0 < len(shown) <= tokens
    shown.sort(key=lambda box: box.y0)
    assert all(a.y1 <= b.y0 + 1 for a, b in zip(shown, shown[1:], strict=False))  # no overlap


@pytest.mark.parametrize("words, tokens", [(6, 3), (80, 100)])
def test_the_heatmap_is_captums_and_writes_only_values_that_fit(words, tokens, monkeypatch):
    """Captum writes a text into every cell (27 s for 100 output tokens by 600
    features, over 5 minutes for 300 by 3,000), which were then dropped as too
    small: ours writes the values that fit, and is Captum's figure otherwise."""
    from captum.attr._core.llm_attr import LLMAttributionResult
    from matplotlib.axes import Axes

    res = MultimodalLLMAttributionResult(
        input_tokens=[f"w{i}" for i in range(words)],
        output_tokens=[f"t{j}" for j in range(tokens)],
        seq_attr=torch.randn(words), token_attr=torch.randn(tokens, words),
    )  # fmt: skip
    captums = res._fitted(LLMAttributionResult.plot_token_attr(res), False, None, heatmap=True)
    written = []
    text = Axes.text
    monkeypatch.setattr(Axes, "text", lambda *a, **k: written.append(a[3]) or text(*a, **k))
    (fig, ax), (theirs, their_ax) = res.plot_token_attr(), captums
    assert tuple(fig.get_size_inches()) == tuple(theirs.get_size_inches())
    assert (ax.images[0].get_array() == their_ax.images[0].get_array()).all()
    assert ax.images[0].get_clim() == their_ax.images[0].get_clim()
    assert ax.images[0].get_cmap().name == their_ax.images[0].get_cmap().name
    for get in ("get_xticklabels", "get_yticklabels"):
        labels = [(t.get_text(), t.get_visible(), t.get_fontsize()) for t in getattr(ax, get)()]
        assert labels == [(t.get_text(), t.get_visible(), t.get_fontsize())
                          for t in getattr(their_ax, get)()]  # fmt: skip
    assert fig.axes[1].get_ylabel() == theirs.axes[1].get_ylabel() == "Token Attribution"
    cells = [(t.get_position(), t.get_text(), t.get_color(), t.get_fontsize()) for t in ax.texts]
    assert cells == [(t.get_position(), t.get_text(), t.get_color(), t.get_fontsize())
                     for t in their_ax.texts]  # fmt: skip
    assert len(ax.texts) == (words * tokens if words * tokens < 100 else 0)
    assert len(written) <= len(ax.texts) + 2  # the values kept, and one measured a fit


@pytest.mark.parametrize("words", [["What", "is", "the", "capital", "of", "Japan"],
                                   ["a" * 40, "a sentence long enough to be cut short", "x"],
                                   [f"word{i}" for i in range(120)]])  # fmt: skip
def test_labels_lie_inside_the_figure_as_returned(words):
    """Captum's x labels stand above the axes in the default margins: 'capital'
    ran past the top of the figure (whole only when saved with
    bbox_inches="tight", as Jupyter does; cut in a window or a plain savefig)."""
    n = len(words)
    res = MultimodalLLMAttributionResult(
        input_tokens=words, output_tokens=["The", "capital", "Tokyo"],
        seq_attr=torch.randn(n), token_attr=torch.randn(3, n),
    )  # fmt: skip
    for plot in (res.plot_seq_attr, res.plot_token_attr):
        fig, ax = plot()
        drawn = fig.get_tightbbox()  # what a bbox_inches="tight" save would keep, in inches
        width, height = fig.get_size_inches()
        assert 0 <= drawn.x0 and drawn.x1 <= width and 0 <= drawn.y0 and drawn.y1 <= height
        assert ax.get_position().height > 0.2  # the plot keeps its room
        matplotlib.pyplot.close(fig)


LONG_CHAT = (
    Chat()
    .system("You are a helpful assistant who answers questions about geography briefly.")
    .user(
        "I am planning a trip to Europe next summer and would like to visit several "
        "capitals. Which city is the capital of France, and what should I see first?\nThanks!"
    )
    .assistant("Paris. Start with the Louvre and a walk along the Seine, then Montmartre.")
    .user("And Germany?")
)


@pytest.mark.parametrize("unit", ["word", "sentence", "turn"])
def test_the_chat_plot_wraps_its_text_inside_the_figure(unit):
    """A turn or sentence feature is one run of text: it was drawn on one line,
    past the axes, over the colour bar and off the figure. Line breaks were
    dropped, and a word's comma could start the next line."""
    from captum_mllm.testing import tiny_hf_adapter

    model = tiny_hf_adapter()
    inp = ChatInput(LONG_CHAT, model, roles=("user", "assistant"), text_unit=unit)
    res = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(inp, target="Paris")
    width = 40
    fig, ax = res.plot_chat_attr(width=width)
    texts = [t for t in ax.texts if t.get_fontfamily() == ["monospace"]]
    lines: dict[float, list] = {}
    for text in texts:
        x, y = text.get_position()
        assert x + len(text.get_text()) <= width  # inside the axes
        lines.setdefault(y, []).append((x, text.get_text()))
    rows = ["".join(t for _, t in sorted(line)) for _, line in sorted(lines.items())]
    assert all(len(row) <= width for row in rows)
    assert not any(row.lstrip()[:1] in {",", ".", "?", "!"} for row in rows)  # glued to its word
    assert "Thanks!" in rows  # the line break kept
    written = " ".join(turn.text for turn in LONG_CHAT)
    assert " ".join(rows).split() == written.split()  # every word once, in order
    fig.canvas.draw()
    box = ax.get_window_extent()
    assert all(t.get_window_extent().x1 <= box.x1 + 1 for t in texts)  # the glyphs too
    drawn = {p.get_gid() for p in ax.patches if p.get_gid()}
    assert drawn == {f"feature-{i}" for i in range(inp.n_itp_features)}


def test_the_bar_plot_shows_each_standard_error():
    """Our estimators give each feature a standard error; the bar plot drew
    the values alone, as exact as the exact method's."""
    from matplotlib.container import ErrorbarContainer

    values = torch.tensor([0.5, -0.25, 0.125])
    res = MultimodalLLMAttributionResult(
        input_tokens=["a", "b", "c"], output_tokens=["x"], seq_attr=values,
        seq_attr_stderr=torch.tensor([0.125, 0.0625, float("inf")]),  # c: no spread seen
    )  # fmt: skip
    _, ax = res.plot_seq_attr()
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    spans = [segment.tolist() for segment in bars.lines[2][0].get_segments()]
    assert spans[:2] == [[[0, 0.375], [0, 0.625]], [[1, -0.3125], [1, -0.1875]]]
    assert spans[2] == []  # an infinite one is not drawn
    for stderr in (None, torch.zeros(3)):  # exact methods report 0s: no bars, no legend
        exact = MultimodalLLMAttributionResult(input_tokens=["a", "b", "c"], output_tokens=["x"],
                                               seq_attr=values, seq_attr_stderr=stderr)  # fmt: skip
        _, ax = exact.plot_seq_attr()
        assert not [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert ax.get_legend() is None


def test_the_chat_plot_names_what_it_attributes():
    """plot_chat_attr(target_token_pos=3) coloured the chat by one output token's
    row without saying which token, or which answer, that was."""
    from captum_mllm.testing import tiny_hf_adapter

    model = tiny_hf_adapter()
    inp = ChatInput(Chat().user("What is the capital of France?"), model)
    res = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(
        inp, target="Paris is big."
    )
    tokens = res.output_tokens
    titles = {
        pos: res.plot_chat_attr(target_token_pos=pos)[1].get_title(loc="left")
        for pos in (None, 1, -1, (0, 2))
    }
    assert titles[None] == "Attribution to the answer 'Paris is big.'"
    assert titles[1] == f"Attribution to output token 1: {tokens[1]!r}"
    assert titles[-1] == f"Attribution to output token {len(tokens) - 1}: {tokens[-1]!r}"
    assert titles[(0, 2)] == f"Attribution to output tokens 0-1: {tokens[0] + ' ' + tokens[1]!r}"


def _uncovered(fig):
    """Texts holding characters that none of the fonts matplotlib resolves for
    them draws (drawn as empty boxes), with those characters."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font
    from matplotlib.text import Text

    out = []
    for text in fig.findobj(Text):
        paths = font_manager.fontManager._find_fonts_by_props(text.get_fontproperties())
        held = set().union(*(FT2Font(str(p)).get_charmap() for p in paths))
        lacking = {c for c in text.get_text() if not c.isspace() and ord(c) not in held}
        if lacking:
            out.append((text.get_text(), lacking))
    return out


def test_chinese_and_japanese_labels_are_drawn_in_a_font_holding_them(cjk_font, lfm):
    """matplotlib's DejaVu fonts hold no Chinese or Japanese: every label, the
    answer in the title and the chat plot's words were empty boxes, even where
    a font holding them was installed."""
    import io
    import warnings

    from captum_mllm.testing import tiny_hf_adapter

    model = tiny_hf_adapter()
    inp = ChatInput(Chat().user("我想去北京旅游? Thanks, 谢谢"), model, text_unit="token")
    res = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(inp, target="东京です")
    spans = [(0.0, 0.4, "东京"), (0.4, 0.8, "日本")]
    chat = Chat().user("はい", audio=speech_like(0.8), sample_rate=16000)
    heard = MultimodalLLMAttribution(FeatureAblation(lfm), lfm).attribute(
        ChatInput(chat, lfm, audio_unit=spans), target="谢谢"
    )
    long = "我想去北京旅游" * 6 + "。"  # a sentence label is cut to fit, in new tick labels
    said = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(
        ChatInput(Chat().user(f"{long} {long}"), model, text_unit="sentence"), target="东京"
    )
    figures = [res.plot_token_attr()[0], res.plot_seq_attr()[0], res.plot_chat_attr()[0],
               heard.plot_audio_attr()[0], heard.plot_chat_attr()[0], said.plot_seq_attr()[0],
               said.plot_token_attr()[0]]  # fmt: skip
    for fig in figures:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fig.savefig(io.BytesIO())
        assert not [w for w in caught if "missing from font" in str(w.message)]
        assert _uncovered(fig) == []  # whichever installed font holds them


def test_characters_no_font_holds_are_named_once(monkeypatch):
    """Without a font holding Chinese, matplotlib warned once per character and
    font at every drawing (37 lines on the command line for one question): now
    one warning of ours names them, at the caller's line, once a session."""
    import warnings

    from captum_mllm.testing import tiny_hf_adapter
    from captum_mllm.viz import fonts

    monkeypatch.setattr(fonts, "_regular_fonts", lambda: [])  # as on a machine without them
    monkeypatch.setattr(fonts, "_WARNED", set())
    model = tiny_hf_adapter()
    inp = ChatInput(Chat().user("北京 is big"), model, text_unit="token")
    res = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(inp, target="是的")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figures = [res.plot_token_attr()[0], res.plot_seq_attr()[0], res.plot_chat_attr()[0]]
    assert not [w for w in caught if "missing from font" in str(w.message)]
    ours = [w for w in caught if "no installed font holds" in str(w.message)]
    assert [str(w.message).split(":")[0] for w in ours] == ["no installed font holds 北 京 是 的"]
    assert ours[0].filename == __file__
    assert _uncovered(figures[0])  # still drawn as boxes: named, not hidden
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res.plot_seq_attr()
    assert not [w for w in caught if "font" in str(w.message)]


def test_wide_characters_take_two_cells_of_the_chat_plot(cjk_font):
    """A Chinese character is about twice as wide as a monospace letter: laid
    out one cell each, they were drawn over each other and past their boxes."""
    from captum_mllm.testing import tiny_hf_adapter
    from captum_mllm.viz.chat import cells

    model = tiny_hf_adapter()
    text = "我想去北京旅游，请问 Thanks a lot, 谢谢!"
    inp = ChatInput(Chat().user(text), model)
    res = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(inp, target="东京")
    width = 13
    fig, ax = res.plot_chat_attr(width=width)
    fig.canvas.draw()
    words = [t for t in ax.texts if "monospace" in t.get_fontfamily()]
    boxes = [p for p in ax.patches if (p.get_gid() or "").startswith("feature-")]
    read = "".join(t.get_text() for t in sorted(words, key=lambda t: t.get_position()[::-1]))
    assert read.replace(" ", "") == text.replace(" ", "")  # every character once, in order
    for t in words:
        x, y = t.get_position()
        wide = len(t.get_text()) == 1 and cells(t.get_text()) == 2
        start = x - 1 if wide else x  # a wide character is centred in its two cells
        assert start + cells(t.get_text()) <= width
        if not t.get_text().strip() or t.get_color() != "black":
            continue
        glyphs = t.get_window_extent()
        (box,) = [b for b in boxes if b.get_y() < y < b.get_y() + b.get_height()
                  and b.get_x() <= start < b.get_x() + b.get_width()]  # fmt: skip
        drawn = box.get_window_extent()
        assert drawn.x0 - 1 <= glyphs.x0 and glyphs.x1 <= drawn.x1 + 1


def test_combining_marks_take_no_cell_of_the_chat_plot():
    """An accent written as a combining mark is drawn over its letter: counted
    as a cell of its own, each word's box ran a cell past the word."""
    from captum_mllm.testing import tiny_hf_adapter

    model = tiny_hf_adapter()
    text = "Cafe\u0301 cre\u0300me bru\u0302le\u0301e"
    inp = ChatInput(Chat().user(text), model)
    res = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(inp, target="Yes")
    fig, ax = res.plot_chat_attr(width=40)
    fig.canvas.draw()
    cell = ax.transData.transform((1, 0))[0] - ax.transData.transform((0, 0))[0]
    boxes = {p.get_x(): p for p in ax.patches if (p.get_gid() or "").startswith("feature-")}
    words = [t for t in ax.texts if t.get_text().strip() in text.split()]
    assert len(words) == 3
    for t in words:
        glyphs, box = t.get_window_extent(), boxes[t.get_position()[0]].get_window_extent()
        assert abs(box.x1 - glyphs.x1) < 0.6 * cell  # the box ends with its word


def test_dollar_signs_are_drawn_as_written():
    """matplotlib reads text between two "$" as a formula: a prompt's "It
    costs $5 and $10." was drawn "It costs 5and10." with the middle in italics."""
    import matplotlib.pyplot as plt

    from captum_mllm.testing import tiny_hf_adapter

    model = tiny_hf_adapter()
    text = "It costs $5 and $10. Use $x^2$ now."
    inp = ChatInput(Chat().user(text), model, text_unit="sentence")
    res = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(inp, target="$15")
    plain = plt.figure().add_subplot()  # the oracle: the same string, same font, as plain text
    for fig, _ in (res.plot_seq_attr(), res.plot_token_attr(), res.plot_chat_attr()):
        fig.canvas.draw()
        texts = fig.findobj(matplotlib.text.Text)
        drawn = [t for t in texts if "$" in t.get_text() and t.get_visible()]
        assert len(drawn) >= 2
        for t in drawn:
            ref = plain.text(0, 0, t.get_text(), fontproperties=t.get_fontproperties(),
                             rotation=t.get_rotation(), parse_math=False)  # fmt: skip
            box = ref.get_window_extent(plain.figure.canvas.get_renderer())
            got = t.get_window_extent()
            assert abs(got.width - box.width) + abs(got.height - box.height) < 1, t.get_text()
    # A log axis' numbers are mathtext its formatter writes: as_written keeps them math
    from captum_mllm.viz import as_written

    fig, ax = plt.subplots()
    ax.semilogy([1e-6, 3e-5])
    as_written(fig)
    fig.canvas.draw()
    assert all(t.get_parse_math() for t in ax.get_yticklabels())


def test_code_is_laid_out_as_a_terminal_shows_it():
    """A tab, a carriage return or a bell in a prompt (code, Windows line
    ends) was drawn as a box for a glyph no font has, one cell wide."""
    import io
    import warnings

    from captum_mllm.testing import tiny_hf_adapter

    model = tiny_hf_adapter()
    code = "Fix this:\r\ndef f(x):\r\n\tif x:\n\t\treturn 1\x07\n  \treturn 2"
    inp = ChatInput(Chat().user(code), model)
    res = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(inp, target="ok")
    fig, ax = res.plot_chat_attr(width=40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.savefig(io.BytesIO())
    assert not [w for w in caught if "missing from font" in str(w.message)]
    lines: dict[float, list] = {}
    for text in ax.texts:
        if "monospace" in text.get_fontfamily():
            x, y = text.get_position()
            lines.setdefault(y, []).append((x, text.get_text()))
    rows = ["".join(t for _, t in sorted(line)) for _, line in sorted(lines.items())]
    shown = code.replace("\r\n", "\n").replace("\x07", "").expandtabs(4)  # the oracle
    assert rows == shown.split("\n")


def test_a_long_answer_is_shortened_in_the_title_in_any_script():
    """textwrap's shorten cuts at spaces only: a Chinese answer (none) was
    titled "the answer '...'"."""
    from captum_mllm.testing import tiny_hf_adapter

    model = tiny_hf_adapter()
    inp = ChatInput(Chat().user("Tell me."), model)
    chinese = ("北京是中国的首都，也是一座历史悠久的城市。" * 5, "北京是中国的首都")
    for answer, head in (chinese, ("Paris is a very big city with " * 5, "Paris is a very")):
        res = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(inp, target=answer)
        title = res.plot_chat_attr()[1].get_title(loc="left")
        said = title.removeprefix("Attribution to the answer '").removesuffix("...'")
        assert said.startswith(head) and 35 <= len(said) <= 67
        assert answer.startswith(said)


def test_a_long_label_without_spaces_is_cut_not_dropped(cjk_font):
    """Captum shortens its tick labels with textwrap's shorten, which cuts at
    spaces only: a Chinese sentence feature (none) was labelled "..." alone."""
    from captum_mllm.testing import tiny_hf_adapter

    model = tiny_hf_adapter()
    said = "我想去北京旅游" * 9 + "。"
    inp = ChatInput(Chat().user(f"{said} Thanks."), model, text_unit="sentence")
    res = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(inp, target="东京")
    for _, ax in (res.plot_seq_attr(), res.plot_token_attr()):
        first, second = (t.get_text() for t in ax.get_xticklabels())
        assert first.endswith("…") and said.startswith(first[:-1]) and len(first) >= 20
        assert second == "Thanks."


def test_a_right_to_left_paragraph_is_laid_out_from_the_right():
    """Hebrew and Arabic were laid out left to right, a word after another:
    a sentence read backwards, its question mark on the wrong side. Oracle:
    python-bidi's reordering of each line (Unicode's bidirectional algorithm)."""
    from bidi import get_display

    from captum_mllm.testing import tiny_hf_adapter
    from captum_mllm.viz.chat import cells

    model = tiny_hf_adapter()
    paragraphs = [
        "מה בירת «צרפת»? תגיד לי, GPT 4.",
        "And what is 2024 in עברית?",
        "ما هي عاصمة فرنسا؟ 3.5%",
    ]
    inp = ChatInput(Chat().user("\n".join(paragraphs)), model)
    res = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(inp, target="ok")
    fig, ax = res.plot_chat_attr(width=40)
    rows: dict[float, list] = {}
    for text in ax.texts:
        if "monospace" in text.get_fontfamily():
            x, y = text.get_position()
            rows.setdefault(y, []).append((x, text.get_text()))
    drawn = [sorted(row) for _, row in sorted(rows.items())]
    # each text is drawn as matplotlib orders one text (libraqm, as python-bidi does;
    # a right-to-left mark leads a text that holds no letter to order it so)
    shown = ["".join(get_display(t).replace("\u200f", "") for _, t in row) for row in drawn]
    assert shown == [get_display(p) for p in paragraphs]
    ends = [max(x + cells(t) for x, t in row) for row in drawn]
    assert ends[0] == ends[2] == 40 and ends[1] < 40  # from the right margin
    assert min(x for x, _ in drawn[1]) == 0
    # each feature's box lies under its own word
    boxes = {p.get_gid(): p.get_x() for p in ax.patches if isinstance(p, Rectangle) and p.get_gid()}
    words = {(x, t.strip()) for row in drawn for x, t in row}
    for f, word in enumerate(res.input_tokens):
        assert (boxes[f"feature-{f}"], word) in words
    # wrapped: every line of a right-to-left paragraph ends at the right margin
    inp = ChatInput(Chat().user(paragraphs[0]), model)
    res = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(inp, target="ok")
    rows = {}
    for text in res.plot_chat_attr(width=12)[1].texts:
        if "monospace" in text.get_fontfamily() and text.get_text().strip():
            x, y = text.get_position()
            rows[y] = max(rows.get(y, 0), x + cells(text.get_text().rstrip()))
    assert len(rows) >= 3 and set(rows.values()) == {12}


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="ab Z" + "שלום" + "مرحبا" + "0123,.:%$+-/ ?!'" + "٣٤\u064e\u0301", max_size=24)
)
def test_lines_are_reordered_as_unicodes_bidirectional_algorithm_orders_them(line):
    """Oracle: python-bidi (the unicode-bidi crate) on the same line."""
    from bidi import get_display

    from captum_mllm.viz.bidi import base_level, levels, visual_runs

    base = base_level(line)
    lev = levels(line, base)
    runs = visual_runs(lev)
    ours = "".join(line[a:b][::-1] if lev[a] % 2 else line[a:b] for a, b in runs)
    assert ours == get_display(line, base_dir="R" if base else "L")
    assert sorted(k for a, b in runs for k in range(a, b)) == list(range(len(line)))


def test_a_line_breaks_between_words_of_a_script_written_without_spaces():
    """A Thai sentence has no spaces: it was cut at the line's last cell, in
    the middle of a word (อย|าก). Lines now break between its words, as
    between Chinese characters, and never before a full stop."""
    from captum_mllm.testing import tiny_hf_adapter

    model = tiny_hf_adapter()
    for text, width in (("ฉันชอบกินข้าวผัดมากและอยากไปเที่ยวทะเล", 10),
                        ("北京是中国的首都。上海「很大」。", 12)):  # fmt: skip
        inp = ChatInput(Chat().user(text), model)
        res = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(inp, target="ok")
        rows: dict[float, list] = {}
        for t in res.plot_chat_attr(width=width)[1].texts:
            if "monospace" in t.get_fontfamily():
                rows.setdefault(t.get_position()[1], []).append((t.get_position()[0], t.get_text()))
        lines = ["".join(t for _, t in sorted(row)) for _, row in sorted(rows.items())]
        assert len(lines) >= 3 and "".join(lines) == text
        words = iter(inp.values)
        for line in lines:  # each line holds whole words, in order
            assert not line.startswith(("。", "」")) and not line.endswith("「"), lines
            rest = line.lstrip("「")
            while rest:
                word = next(words)
                assert rest.startswith(word), (line, word)
                rest = rest[len(word) :].lstrip("。「」")


def test_bidirectional_controls_are_drawn_by_name():
    """matplotlib obeyed a right-to-left override inside a drawn text: "resu
    nimda" after one read "admin user" in the chat plot ("Trojan Source").
    Each control is drawn by name instead, in every text as_written sees."""
    import matplotlib.pyplot as plt

    from captum_mllm.testing import tiny_hf_adapter
    from captum_mllm.viz import as_written

    controls = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
    model = tiny_hf_adapter()
    chat = Chat().user("Please grant access \u202eresu nimda\u202c to me")
    res = MultimodalLLMAttribution(FeatureAblation(model), model).attribute(
        ChatInput(chat, model), target="ok"
    )
    fig, ax = res.plot_chat_attr(width=60)
    pieces = sorted(
        (t.get_position()[0], t.get_text()) for t in ax.texts if "monospace" in t.get_fontfamily()
    )
    drawn = [text for _, text in pieces]
    assert not [t for t in drawn if any(c in t for c in controls)]
    assert "".join(drawn) == "Please grant access ⟨RLO⟩resu nimda⟨PDF⟩ to me"
    for (x, text), (after, _) in zip(pieces, pieces[1:], strict=False):
        assert after >= x + len(text)  # the names take their cells: nothing drawn over them
    fig, ax = plt.subplots()  # any figure's texts: a label of the user's own
    label = ax.set_xlabel("user \u2067resu\u2069")
    as_written(fig)
    assert label.get_text() == "user ⟨RLI⟩resu⟨PDI⟩"
