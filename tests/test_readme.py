"""The README's Python examples run, in order, as a reader would paste them,
on the tiny offline models (each hub load swapped for its tiny stand-in)."""

import re
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
import soundfile as sf

from captum_mllm import MultimodalLLMAttributionResult
from captum_mllm.testing import speech_like

README = Path(__file__).parents[1] / "README.md"

#: What each example needs that a reader's machine has and this one lacks, or
#: costs more than a test should; every pattern must still be in the README.
SWAPS = [
    (r'HFCausalLMAdapter\.from_pretrained\("[^"]*", device="cuda"\)', "tiny_hf_adapter()"),
    (r'LFM2AudioAdapter\.from_pretrained\("[^"]*"(, device="cuda")?\)', "tiny_lfm2()"),
    (r'ForcedAligner\("facebook/wav2vec2-base-960h"\)', "tiny_wav2vec2_aligner()"),
    (r'"max_new_tokens": 32', '"max_new_tokens": 4'),
    (r"n_samples=64", "n_samples=2"),
    (r"budget=2000", "budget=40"),
    (r"num_workers=8\)", "use_ray=False)"),
    (r"num_shards=8\)", "num_shards=2, use_ray=False)"),
]
#: Names the examples use without defining them.
GIVEN = """
from captum_mllm import *
from captum_mllm.testing import tiny_hf_adapter, tiny_lfm2_audio, tiny_wav2vec2_aligner
tiny_lfm2 = lambda: LFM2AudioAdapter(*tiny_lfm2_audio())
chats = [Chat().user("Why is the sky blue?"), Chat().user("Name a red fruit.")]
factory = tiny_lfm2  # explain_sharded's, for the spoken chat of the LFM2-Audio example
"""


@pytest.mark.filterwarnings("ignore:integrated gradients' attributions of answer token")
@pytest.mark.filterwarnings("ignore:Lfm2Model's conv layers mix positions")  # tiny random models
def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write files where they run
    matplotlib.use("Agg")
    sf.write("question.wav", speech_like(2.0).numpy(), 16000)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    text = "\n".join(blocks)
    for pattern, _ in SWAPS:
        assert re.search(pattern, text), f"the README no longer holds {pattern}: update SWAPS"
    namespace: dict = {}
    exec(GIVEN, namespace)
    for i, block in enumerate(blocks):
        for pattern, swap in SWAPS:
            block = re.sub(pattern, swap, block)
        if "res_shapley" in block:  # the gradient example compares with the last Shapley result
            namespace["res_shapley"] = namespace["res"]
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as exc:
            pytest.fail(f"README python block {i + 1} raised {type(exc).__name__}: {exc}")
    assert isinstance(namespace["res"], MultimodalLLMAttributionResult)
    assert isinstance(namespace["features"], pd.DataFrame) and len(namespace["features"])
    assert set(namespace["table"]["chat"]) == {"chat_00000", "chat_00001"}
