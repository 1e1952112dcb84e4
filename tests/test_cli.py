"""The captum-mllm command: chats from files, reports, one-line errors with exit code 2."""

import json
import os
import subprocess
import sys
import warnings
from importlib.resources import files
from pathlib import Path

import pandas as pd
import pytest

from captum_mllm import MultimodalLLMAttributionResult
from captum_mllm.cli import main

QUESTION_WAV = str(files("captum_mllm") / "data" / "question.wav")
TRANSCRIPT = "what is the capital of france"  # what question.wav says


def run(argv, capsys):
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def explain_quietly(data, out, capsys):
    """``explain-dataset`` of a data set on the tiny Llama, its warnings unshown
    (its template renders no tools, and says so)."""
    argv = ["explain-dataset", data, "--model", "tiny-llama", "--no-ray", "--budget", "20",
            "--max-new-tokens", "2", "--out", out]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run(argv, capsys)


def test_a_json_chat_with_an_audio_file(tmp_path, capsys):
    (tmp_path / "clips").mkdir()
    clip = tmp_path / "clips" / "question.wav"
    clip.write_bytes(Path(QUESTION_WAV).read_bytes())
    chat = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "audio", "path": "clips/question.wav"},  # relative to the JSON file
                {"type": "text", "text": "Answer it."},
            ],
        },
    ]
    (tmp_path / "chat.json").write_text(json.dumps(chat), encoding="utf-8-sig")  # a BOM too
    out = tmp_path / "out"
    code, printed, err = run(
        ["explain", "--chat", tmp_path / "chat.json", "--model", "tiny-lfm2-audio",
         "--method", "exact", "--audio-unit", "1.0", "--max-new-tokens", "4", "--out", out],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "answer:" in printed
    for name in (
        "seq_attr.png",
        "token_attr.png",
        "chat_attr.png",  # the whole chat was drawn nowhere
        "audio_attr.png",
        "attributions.csv",
        "result.json",
        "report.html",
    ):
        assert (out / name).is_file()
    res = MultimodalLLMAttributionResult.load(out / "result.json")
    audio = [f for f in res.features if f.modality == "audio_in"]
    assert len(audio) == 3 and res.clips[0].path == str(clip)  # 2.2 s in 1 s windows
    assert res.provenance["method"] == "ExactShapleyValues"


def test_every_clip_is_drawn(tmp_path, capsys):
    # Only the chat's first clip was drawn; the second turn's went unseen
    out = tmp_path / "out"
    code, printed, err = run(
        ["explain", "--model", "tiny-lfm2-audio", "--user", "One.", "--user-audio", QUESTION_WAV,
         "--user", "Two.", "--user-audio", QUESTION_WAV, "--audio-unit", "1.0",
         "--max-new-tokens", "2", "--budget", "20", "--out", out],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    drawn = sorted(p.name for p in out.glob("audio_attr*.png"))
    assert drawn == ["audio_attr.png", "audio_attr_clip1.png"]
    assert all(name in printed for name in drawn)


def test_a_yaml_chat_and_a_report(tmp_path, capsys):
    (tmp_path / "chat.yaml").write_text(
        "- role: system\n  content: You are a helpful assistant.\n"
        "- role: user\n  content: Who are you, my friend?\n"
    )
    out = tmp_path / "out"
    code, printed, err = run(
        ["explain", "--chat", tmp_path / "chat.yaml", "--model", "tiny-llama", "--budget", "40",
         "--answer", "I am a small model.", "--out", out],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "friend" in printed
    saved = MultimodalLLMAttributionResult.load(out / "result.json")
    assert saved.input_tokens == ["Who", "are", "you", "my", "friend"]
    assert saved.seq_attr_stderr is not None
    (out / "seq_attr.png").unlink()
    (out / "report.html").unlink()
    code, printed, err = run(["report", out / "result.json"], capsys)
    assert code == 0, err
    assert (out / "seq_attr.png").is_file() and "friend" in printed
    assert "friend" in (out / "report.html").read_text()
    (out / "report.html").unlink()
    code, _, err = run(["report", out], capsys)  # the folder explain wrote (it was refused)
    assert code == 0 and (out / "report.html").is_file(), err
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "summary.csv").write_text("chat\n")
    code, _, err = run(["report", tmp_path / "runs"], capsys)
    assert code == 2 and "is an explain-dataset folder: its index.html links" in err


def test_batch_sets_coalitions_a_call_and_changes_no_value(tmp_path, capsys):
    """Also: the question may be given alone (`explain "Who ..."` was refused
    as an unrecognised argument), the same chat as --user."""
    saved = []
    question = "Who are you, my friend?"
    for batch, asked in ((["--batch", "1"], [question]), ([], ["--user", question])):
        out = tmp_path / f"out{len(saved)}"
        code, _, err = run(
            ["explain", *asked, "--model", "tiny-llama",
             "--method", "exact", "--answer", "I am a small model.", "--out", out, *batch],
            capsys,
        )  # fmt: skip
        assert code == 0, err
        saved.append(MultimodalLLMAttributionResult.load(out / "result.json"))
    one, default = saved
    assert one.n_model_calls > 2**5  # every coalition alone
    assert default.n_model_calls <= 3  # prefix, then all 32 (the default batches)
    assert one.seq_attr.tolist() == pytest.approx(default.seq_attr.tolist(), abs=1e-5)
    assert one.input_tokens == default.input_tokens and one.segments == default.segments


def test_explain_dataset_reads_batch_too(tmp_path, capsys):
    # --batch reached explain only: explain-dataset scored 64 coalitions a call
    (tmp_path / "chats.jsonl").write_text(
        json.dumps([{"role": "user", "content": "Who are you, my friend?"},
                    {"role": "assistant", "content": "I am a small model."}]) + "\n"
    )  # fmt: skip
    calls = {}
    for batch in ("1", "64"):
        out = tmp_path / batch
        code, _, err = run(["explain-dataset", tmp_path / "chats.jsonl", "--model", "tiny-llama",
                            "--no-ray", "--method", "exact", "--batch", batch, "--out", out],
                           capsys)  # fmt: skip
        assert code == 0, err
        res = MultimodalLLMAttributionResult.load(out / "chat_00000" / "result.json")
        calls[batch] = res.n_model_calls
    assert calls["1"] > 2**5 and calls["64"] <= 3


def test_captum_sampling_over_a_data_set_is_seeded_per_chat(tmp_path, capsys):
    """explain-dataset --method captum-svs drew each chat's orders from where
    the chat before left torch's generator: a chat's values hung on the order
    of the file. --seed now reaches Captum's sampler as it reaches ours."""
    questions = ["Who are you, my friend?", "Why is it blue today?"]
    rows = [json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": text}]})
            for i, text in enumerate(questions)]  # fmt: skip
    values = {}
    for order in ("forward", "reversed"):
        data = tmp_path / f"{order}.jsonl"
        data.write_text("\n".join(rows if order == "forward" else rows[::-1]) + "\n")
        code, _, err = run(["explain-dataset", data, "--model", "tiny-llama", "--no-ray",
                            "--method", "captum-svs", "--max-new-tokens", "3", "--out",
                            tmp_path / order], capsys)  # fmt: skip
        assert code == 0, err
        for name in ("q0", "q1"):
            res = MultimodalLLMAttributionResult.load(tmp_path / order / name / "result.json")
            values[order, name] = res.seq_attr
            assert res.provenance["method_args"]["seed"] == 0
    for name in ("q0", "q1"):
        assert values["forward", name].tolist() == values["reversed", name].tolist()


def test_target_stderr_and_baselines_reach_the_run(tmp_path, capsys):
    chat = ["--user", "Who are you, my friend?", "--model", "tiny-llama",
            "--answer", "I am a small model."]  # fmt: skip
    runs = {}
    for name, flags in [("cap", []), ("stop", ["--target-stderr", "50"]),
                        ("replace", ["--text-baseline", "replace"])]:  # fmt: skip
        out = tmp_path / name
        code, _, err = run(["explain", *chat, "--method", "permutation", "--budget", "400",
                            "--out", out, *flags], capsys)  # fmt: skip
        assert code == 0, err
        runs[name] = MultimodalLLMAttributionResult.load(out / "result.json")
    assert runs["cap"].n_coalitions >= 380  # one pair of orders of 5 features is 10 coalitions
    assert runs["stop"].n_coalitions < runs["cap"].n_coalitions / 2  # stopped early
    assert runs["stop"].provenance["method_args"]["target_stderr"] == 50
    assert runs["replace"].provenance["input_settings"]["text_baseline"] == "replace"
    assert runs["cap"].provenance["input_settings"]["text_baseline"] == "drop"
    assert runs["replace"].seq_attr.tolist() != runs["cap"].seq_attr.tolist()
    audio = tmp_path / "audio"
    code, _, err = run(["explain", "--user-audio", QUESTION_WAV, "--model", "tiny-lfm2-audio",
                        "--method", "exact", "--audio-unit", "0.4", "--audio-baseline",
                        "silence", "--answer", "Paris.", "--out", audio], capsys)  # fmt: skip
    assert code == 0, err
    res = MultimodalLLMAttributionResult.load(audio / "result.json")
    assert res.provenance["input_settings"]["audio_baseline"] == "silence"
    passages = tmp_path / "passages"  # one feature a paragraph
    code, _, err = run(["explain", "--user", "One here.\n\nTwo there.\n\nWhich?", "--model",
                        "tiny-llama", "--text-unit", "paragraph", "--method", "exact",
                        "--answer", "One.", "--out", passages], capsys)  # fmt: skip
    assert code == 0, err
    res = MultimodalLLMAttributionResult.load(passages / "result.json")
    assert res.input_tokens == ["One here.", "Two there.", "Which?"]


def test_a_foil_makes_the_explanation_contrastive(tmp_path, capsys):
    argv = ["explain", "--user", "Who are you, my friend?", "--model", "tiny-llama",
            "--method", "exact", "--answer", "Paris."]  # fmt: skip
    runs = {}
    for name, flags in [("plain", []), ("foil", ["--foil", "Lyon."])]:
        code, out, err = run([*argv, *flags, "--out", tmp_path / name], capsys)
        assert code == 0, err
        runs[name] = MultimodalLLMAttributionResult.load(tmp_path / name)
    assert "answer: 'Paris.', rather than 'Lyon.'" in out
    assert runs["foil"].provenance["target"] == {"class": "ContrastiveTarget", "foil": "Lyon."}
    assert runs["foil"].seq_attr.tolist() != runs["plain"].seq_attr.tolist()
    assert "rather than" in (tmp_path / "foil" / "report.html").read_text(encoding="utf-8")
    code, _, err = run([*argv, "--foil", "Lyon.", "--target", "similarity"], capsys)
    assert code == 2 and "--foil weighs log-probabilities" in err


def test_device_and_dtype_reach_the_test_models(tmp_path, capsys, monkeypatch):
    # --dtype and --device went unread for the tiny models: float32 on the CPU
    argv = ["explain", "--user", "Who are you, my friend?", "--model", "tiny-llama",
            "--method", "exact", "--answer", "I am a small model."]  # fmt: skip
    saved = []
    for dtype in ([], ["--dtype", "bfloat16"]):
        code, _, err = run([*argv, *dtype, "--out", tmp_path / str(len(saved))], capsys)
        assert code == 0, err
        saved.append(
            MultimodalLLMAttributionResult.load(tmp_path / str(len(saved)) / "result.json")
        )
    assert saved[0].seq_attr.tolist() != saved[1].seq_attr.tolist()  # bfloat16 rounds
    assert saved[0].seq_attr.tolist() == pytest.approx(saved[1].seq_attr.tolist(), abs=0.5)
    from captum_mllm import HFCausalLMAdapter

    moved, to = [], HFCausalLMAdapter.to
    monkeypatch.setattr(
        HFCausalLMAdapter, "to", lambda self, **kw: moved.append(kw) or to(self, **kw)
    )
    code, _, err = run([*argv, "--device", "cpu:0", "--out", tmp_path / "d"], capsys)
    assert code == 0 and moved == [{"device": "cpu:0", "dtype": None}], err


def test_a_device_is_checked_before_a_model_loads(capsys, monkeypatch):
    """A typo in --device, or a GPU the machine lacks, was found only once the
    model had loaded (on a fresh machine, after converting the default model)."""
    import torch

    import captum_mllm

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(captum_mllm, "load_default_model", no_model)
    monkeypatch.setattr(captum_mllm.HFCausalLMAdapter, "from_pretrained", no_model)
    n = torch.cuda.device_count()
    has = f"{n} cuda device{'s' * (n != 1)}" if n else "no cuda"
    for model in ("default", "some/model"):
        code, _, err = run(["explain", "--user", "Hi", "--model", model,
                            "--device", "no-such-device"], capsys)  # fmt: skip
        assert code == 2 and "argument --device: not a device: 'no-such-device'" in err, err
        code, _, err = run(["explain", "--user", "Hi", "--model", model,
                            "--device", "cuda:99"], capsys)  # fmt: skip
        assert err.strip().splitlines() == [
            f"captum-mllm: error: device 'cuda:99': this machine has {has}"
        ]
        assert code == 2


def test_budget_reaches_every_method_that_reads_one(tmp_path, capsys):
    # --budget once reached hierarchical as nothing (exact Owen values), and
    # captum-svs as 10 permutations when it was below the feature count.
    chat = ["--user", "Who are you, my friend?", "--model", "tiny-llama",
            "--answer", "I am a small model."]  # fmt: skip
    runs = {}
    for name, method, budget in [("owen", "hierarchical", []), ("capped", "hierarchical", ["12"]),
                                 ("svs", "captum-svs", ["4"])]:  # fmt: skip
        out = tmp_path / name
        code, _, err = run(["explain", *chat, "--method", method, "--out", out,
                            *(["--budget", *budget] if budget else [])], capsys)  # fmt: skip
        assert code == 0, err
        runs[name] = MultimodalLLMAttributionResult.load(out / "result.json")
    assert runs["owen"].provenance["method_args"].get("budget") is None
    assert runs["capped"].provenance["method_args"]["budget"] == 12
    assert runs["capped"].n_coalitions < runs["owen"].n_coalitions
    assert runs["svs"].provenance["method_args"]["n_samples"] == 1  # 4 // 5 features, at least 1
    (tmp_path / "chats.jsonl").write_text(json.dumps([{"role": "user", "content": "Hi"}]) + "\n")
    code, _, err = run(["explain-dataset", tmp_path / "chats.jsonl", "--model", "tiny-llama",
                        "--no-ray", "--method", "captum-svs", "--budget", "20",
                        "--out", tmp_path / "runs"], capsys)  # fmt: skip
    assert code == 2 and "--method permutation" in err


def test_hierarchical_on_a_long_question_samples_within_a_bound(tmp_path, capsys):
    """A sentence of more than 16 words was refused ("group them into
    sub-lists"), and its exact Owen values would take hours on a real model:
    the command samples 10 coalitions per feature and says so on a line of
    its own (not the console script's path and source line, nor after the
    progress bar on the bar's line)."""
    question = " ".join(f"word{i}" for i in range(40))
    script = Path(sys.executable).with_name("captum-mllm")  # as a user runs it
    done = subprocess.run(
        [script, "explain", question, "--model", "tiny-llama", "--answer", "Yes.",
         "--method", "hierarchical", "--out", tmp_path],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert "\ncaptum-mllm: warning: exact Owen values of this tree need 20,160 coalitions" in err
    assert "sys.exit" not in err and "UserWarning" not in err
    res = MultimodalLLMAttributionResult.load(tmp_path / "result.json")
    assert len(res.features) == 40 and res.n_coalitions <= 400
    assert res.provenance["method_settings"]["exact_limit"] == 16384
    code, _, _ = run(["explain", "--model", "tiny-llama"], capsys)  # in process: no chat
    assert code == 2 and warnings.formatwarning.__module__ == "warnings"  # put back after


@pytest.mark.parametrize(
    "argv, says",
    [
        (["explain", "--model", "tiny-llama"], "no chat"),
        (["explain", "Hi", "--user", "Hi", "--model", "tiny-llama"], "give the question once"),
        (["explain", "--chat", "/nonexistent/chat.json"], "cannot read"),
        (["explain", "--chat", "{bad}", "--model", "tiny-llama"], "not valid JSON"),
        (["explain", "--user", "Hi", "--model", "/nonexistent/model"], "no model folder or file"),
        # a relative path said "Repo id must use alphanumeric chars" (a hub id's rules)
        (["explain", "--user", "Hi", "--model", "./no_such_model"], "no model folder or file at"),
        # the embedded model on a missing device raised a traceback
        (["explain", "--user", "Hi", "--device", "cuda:99"], "this machine has"),
        (
            ["explain", "--user", "Hi", "--audio-unit", "syllable", "--model", "tiny-llama"],
            "audio-unit",
        ),
        (["explain", "--user", "Hi", "--model", "tiny-llama", "--roles", "robot"], "unknown roles"),
        (["report", "/nonexistent/result.json"], "no saved result"),
        (
            ["explain", "--user", "Hi", "--answer", "Hello", "--max-new-tokens", "5"],
            "--max-new-tokens is unused",
        ),
        (
            [
                "explain",
                "--user-audio",
                QUESTION_WAV,
                "--audio-unit",
                "word",
                "--model",
                "tiny-llama",
            ],
            "--transcript",
        ),
        (
            ["explain", "--user-audio", QUESTION_WAV, "--audio-unit", "word", "--transcript", "hi"],
            "--aligner",
        ),
        # named LeverageKernelShap, a class, after the answer was generated
        (
            [
                "explain",
                " ".join(f"w{i}" for i in range(21)),
                "--model",
                "tiny-llama",
                "--method",
                "exact",
            ],
            "has 21 features (2^21 = 2,097,152; at most 20): use --method bayes, kernel",
        ),  # fmt: skip
    ],
)
def test_mistakes_exit_with_2_and_one_line(argv, says, tmp_path, capsys):
    argv = [str(tmp_path / "bad.json") if a == "{bad}" else a for a in argv]
    (tmp_path / "bad.json").write_text("{not json")
    code, _, err = run([*argv, "--out", tmp_path] if argv[0] == "explain" else argv, capsys)
    assert code == 2
    assert says in err and len(err.strip().splitlines()) == 1


def test_spoken_words_as_features_with_an_aligner_and_transcript(tmp_path, capsys):
    code, _, err = run(
        ["explain", "--user-audio", QUESTION_WAV, "--model", "tiny-lfm2-audio",
         "--audio-unit", "word", "--aligner", "demo", "--transcript", TRANSCRIPT,
         "--method", "exact", "--max-new-tokens", "2", "--out", tmp_path],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    res = MultimodalLLMAttributionResult.load(tmp_path / "result.json")
    assert [f.label for f in res.features] == [f"\u266a{w}" for w in TRANSCRIPT.split()]


@pytest.mark.parametrize("command", [[], ["explain"], ["explain-dataset"], ["report"], ["demo"]])
def test_help_reads_as_plain_text(command, capsys):
    """The top help's description was the module docstring's reST (``captum-mllm``)."""
    code, out, _ = run([*command, "--help"], capsys)
    assert code == 0 and "usage: captum-mllm" in out
    assert "``" not in out and ":func:" not in out and ":class:" not in out


def test_python_m_and_bad_flags_exit_with_2():
    done = subprocess.run(
        [sys.executable, "-m", "captum_mllm", "explain", "--no-such-flag"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "--no-such-flag" in done.stderr


HEAVY = ("torch", "transformers", "captum", "numpy", "pandas", "matplotlib")


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["explain", "--help"],
                                  ["explain", "--bogus"],
                                  ["explain", "--user", "Hi", "--budget", "0"]])  # fmt: skip
def test_help_and_flag_mistakes_import_no_torch(argv):
    """``captum-mllm --help`` took 9 s on this 2-core host: ``import captum_mllm``
    imported torch, transformers and Captum before argparse ran."""
    code = (
        "import sys\nfrom captum_mllm.cli import main\ntry:\n    main(sys.argv[1:])\n"
        f"except SystemExit:\n    pass\nprint([m for m in {HEAVY!r} if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


def test_version_is_the_installed_one(capsys):
    from importlib.metadata import version

    import captum_mllm

    assert captum_mllm.__version__ == version("captum-mllm")
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out == f"captum-mllm {captum_mllm.__version__}\n"


def test_every_public_name_is_found_and_typed():
    """Names are imported on first use: each in ``__all__`` is found, and type
    checkers see each (the ``TYPE_CHECKING`` imports name the same set)."""
    import ast

    import captum_mllm

    for name in captum_mllm.__all__:
        assert getattr(captum_mllm, name).__name__ == name
    tree = ast.parse(Path(captum_mllm.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If))  # if TYPE_CHECKING:
    typed = {a.asname or a.name for n in block.body for a in n.names}  # type: ignore[attr-defined]
    assert typed == set(captum_mllm.__all__) == set(captum_mllm._MODULE_OF)


def test_explain_dataset_from_jsonl_and_an_audio_folder(tmp_path, capsys):
    lines = [
        json.dumps([{"role": "user", "content": "Who are you?"}]),
        json.dumps({"id": "sky", "messages": [{"role": "user", "content": "Why is it blue?"}]}),
        json.dumps({"id": "share", "conversations": [{"from": "human", "value": "Hi there"}]}),
    ]
    # as Windows' Notepad saves it: a byte order mark, CRLF line ends
    (tmp_path / "chats.jsonl").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8-sig")
    out = tmp_path / "runs"
    argv = ["explain-dataset", tmp_path / "chats.jsonl", "--model", "tiny-llama", "--no-ray",
            "--max-new-tokens", "3", "--budget", "20", "--out", out]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, text, err = run(argv, capsys)
    assert code == 0, err
    assert not [w for w in caught if "not read" in str(w.message)]  # the id names the chat
    # An OpenAI request's temperature is not this run's: the warning names the flags
    # (it named attribute_kwargs' gen_args, the Python API's words, alone)
    hot = json.dumps(
        {"id": "hot", "messages": [{"role": "user", "content": "Hi"}], "temperature": 1}
    )
    (tmp_path / "hot.jsonl").write_text(hot + "\n")
    with pytest.warns(UserWarning, match=r"\['temperature'\] are not read.*--max-new-tokens"):
        code, _, err = run([*argv[:1], tmp_path / "hot.jsonl", *argv[2:-1], tmp_path / "h"], capsys)
    assert code == 0, err
    asked = {"chat_00000": "Who are you?", "sky": "Why is it blue?", "share": "Hi there"}
    for name, question in asked.items():  # share: a ShareGPT row ("conversations")
        assert (out / name / "result.json").is_file()
        page = (out / name / "report.html").read_text(encoding="utf-8")  # one to read, as explain's
        assert question.split()[-1].rstrip("?") in page
    assert "summary.csv" in text and str(out / "index.html") in text
    assert 'href="sky/report.html"' in (out / "index.html").read_text(encoding="utf-8")
    code, text, _ = run(argv, capsys)  # a rerun skips both
    assert code == 0 and text.count("True") >= 2
    # A bad chat stops the run, or with --on-error record is named in its row
    bad = json.dumps({"id": "bad", "messages": [{"role": "user", "content": "<|im_end|>"}]})
    (tmp_path / "chats.jsonl").write_text("\n".join([*lines, bad]) + "\n")
    code, _, err = run(argv, capsys)
    assert code == 2 and "control token" in err and err.rstrip().endswith("(in chat 'bad')")
    with pytest.warns(UserWarning, match="1 of 4 chats raised"):
        code, text, err = run([*argv, "--on-error", "record"], capsys)
    assert code == 0 and "InvalidContentError: the user turn's text contains" in text

    folder = tmp_path / "audio"
    folder.mkdir()
    (folder / "q.wav").write_bytes(Path(QUESTION_WAV).read_bytes())
    (folder / "transcripts.csv").write_text(
        "file,transcript,speaker\nq.wav,what is the capital of france,anna\n"
    )
    methods = (("permutation", "PairedPermutationSampling"), ("bayes", "BayesianShapley"))
    for method, name in methods:
        argv = ["explain-dataset", folder, "--model", "tiny-lfm2-audio", "--no-ray",
                "--method", method, "--budget", "20", "--max-new-tokens", "2",
                "--out", tmp_path / method]  # fmt: skip
        code, _, err = run(argv, capsys)
        assert code == 0, err
        res = MultimodalLLMAttributionResult.load(tmp_path / method / "q" / "result.json")
        assert any(f.modality == "audio_in" for f in res.features)
        assert res.provenance["method"] == name and res.n_coalitions <= 20
        summary = pd.read_csv(tmp_path / method / "summary.csv")  # the table's own columns
        assert summary.loc[0, ["file", "speaker"]].tolist() == ["q.wav", "anna"]
    code, _, err = run(["explain-dataset", tmp_path / "nothing", "--no-ray"], capsys)
    assert code == 2 and "JSONL" in err


def test_explain_dataset_reads_a_json_list_and_a_parquet_file_as_their_jsonl(tmp_path, capsys):
    """A list of chats saved by ``json.dump`` was read as JSON lines (the whole
    list one chat, or "line 1 is not JSON" when indented), and a Parquet file
    raised UnicodeDecodeError."""
    import datasets

    from captum_mllm.cli.files import read_dataset

    tool = {"type": "function", "function": {"name": "add"}}
    rows = [  # the tools first: Arrow's types are the first row's
        {"id": "sum", "messages": [{"role": "user", "content": "What is 2 + 2?"}], "tools": [tool],
         "label": "math"},
        {"id": "sky", "messages": [{"role": "user", "content": "Why is the sky blue?"}],
         "label": "science"},
    ]  # fmt: skip
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    expected = read_dataset(tmp_path / "chats.jsonl", False)
    assert list(expected) == ["sum", "sky"] and expected["sum"]["tools"] == [tool]
    for indent in (None, 2):
        (tmp_path / "chats.json").write_text(json.dumps(rows, indent=indent))
        assert read_dataset(tmp_path / "chats.json", False) == expected
    by_name = {row["id"]: {k: v for k, v in row.items() if k != "id"} for row in rows}
    (tmp_path / "named.json").write_text(json.dumps(by_name))  # as explain_dataset's mapping
    assert read_dataset(tmp_path / "named.json", False) == expected
    (tmp_path / "one.json").write_text(json.dumps(rows[1]["messages"], indent=2))  # one chat
    assert read_dataset(tmp_path / "one.json", False) == {"chat_00000": rows[1]["messages"]}
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "chats.parquet")  # as the hub holds them
    assert read_dataset(tmp_path / "chats.parquet", False) == expected
    code, _, err = explain_quietly(tmp_path / "chats.parquet", tmp_path / "runs", capsys)
    assert code == 0, err
    assert (tmp_path / "runs" / "sky" / "result.json").is_file()
    summary = pd.read_csv(tmp_path / "runs" / "summary.csv")  # its label column, kept
    assert summary["label"].tolist() == ["math", "science"]
    (tmp_path / "clip.jsonl").write_bytes(Path(QUESTION_WAV).read_bytes())
    code, _, err = run(["explain-dataset", tmp_path / "clip.jsonl", "--no-ray"], capsys)
    assert code == 2 and "is not UTF-8 text" in err


def test_ctrl_c_says_how_to_resume_in_a_line(tmp_path, capsys, monkeypatch):
    """Ctrl-C printed a traceback through torch's modules (and exit code -2)."""
    from captum_mllm import MultimodalLLMAttribution

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def interrupt(argv):
        try:
            return run(argv, capsys)
        except KeyboardInterrupt:  # escaped, it would stop pytest itself
            pytest.fail("Ctrl-C went past the command")

    monkeypatch.setattr(MultimodalLLMAttribution, "attribute", interrupted)
    question = ["explain", "Why is the sky blue?", "--model", "tiny-llama", "--out", tmp_path]
    code, _, err = interrupt(question)
    assert code == 130 and "Traceback" not in err
    assert err.strip() == (
        "captum-mllm: interrupted; with --store FILE a run keeps what it evaluated, "
        "and a rerun resumes from it"
    )
    code, _, err = interrupt([*question, "--store", tmp_path / "run.sqlite"])
    assert code == 130 and f"it resumes from {tmp_path / 'run.sqlite'}" in err
    (tmp_path / "chats.jsonl").write_text(json.dumps([{"role": "user", "content": "Hi"}]) + "\n")
    argv = ["explain-dataset", tmp_path / "chats.jsonl", "--model", "tiny-llama", "--no-ray",
            "--out", tmp_path / "runs"]  # fmt: skip
    code, _, err = interrupt(argv)
    assert code == 130 and "the chats done are skipped" in err


def test_explain_dataset_refuses_two_chats_of_one_name(tmp_path, capsys):
    # the later chat replaced the earlier one: fewer explanations, without a word
    row = {"id": "sky", "messages": [{"role": "user", "content": "Why is it blue?"}]}
    (tmp_path / "chats.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    code, _, err = run(["explain-dataset", tmp_path / "chats.jsonl", "--no-ray"], capsys)
    assert code == 2 and "line 2: the chat name 'sky' is taken" in err
    folder = tmp_path / "audio"
    for sub in ("a", "b"):  # one stem in two folders
        (folder / sub).mkdir(parents=True)
        (folder / sub / "q.wav").write_bytes(Path(QUESTION_WAV).read_bytes())
    (folder / "transcripts.csv").write_text("file,transcript\na/q.wav,one\nb/q.wav,two\n")
    code, _, err = run(["explain-dataset", folder, "--no-ray"], capsys)
    assert code == 2 and "row 2: the chat name 'q' is taken" in err


def test_explain_dataset_from_a_hugging_face_datasets_folder(tmp_path, capsys):
    """``save_to_disk`` of a messages column: Arrow gives every part every key
    (None where unused) and a nested clip's samples as a list."""
    import datasets
    import soundfile as sf

    samples, rate = sf.read(QUESTION_WAV, dtype="float32")
    clip = {"type": "audio", "audio": {"array": samples.tolist(), "sampling_rate": rate}}
    rows = [
        {"id": "spoken", "messages": [{"role": "user", "content": [clip]}]},
        {"id": "typed", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Who are you?"}]}
        ]},
    ]  # fmt: skip
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "data"))
    argv = ["explain-dataset", tmp_path / "data", "--model", "tiny-lfm2-audio", "--no-ray",
            "--budget", "20", "--max-new-tokens", "2", "--out", tmp_path / "runs"]  # fmt: skip
    code, _, err = run(argv, capsys)
    assert code == 0, err
    spoken = MultimodalLLMAttributionResult.load(tmp_path / "runs" / "spoken" / "result.json")
    assert {f.modality for f in spoken.features} == {"audio_in"}
    typed = MultimodalLLMAttributionResult.load(tmp_path / "runs" / "typed" / "result.json")
    assert typed.input_tokens == ["Who", "are", "you"]
    # chat_template_kwargs and tools columns reach the chat template (only messages
    # were read), without the None Arrow fills in for another row's keys (a
    # template reads date_string=None as the date "None")
    dated = {"date_string": "1 Jan 2025"}
    tool = {"type": "function", "function": {"name": "time"}}
    described = {"type": "function", "function": {"name": "sky", "description": "Its colour"}}
    rows = [
        {"id": "dated", "messages": rows[1]["messages"], "chat_template_kwargs": dated,
         "tools": [tool]},
        {"id": "other", "messages": rows[1]["messages"],
         "chat_template_kwargs": {"enable_thinking": False}, "tools": [described]},
    ]  # fmt: skip
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "dated"))
    code, _, err = explain_quietly(tmp_path / "dated", tmp_path / "d", capsys)
    assert code == 0, err
    saved = MultimodalLLMAttributionResult.load(tmp_path / "d" / "dated" / "result.json")
    assert saved.provenance["input_settings"]["chat_template_kwargs"] == {**dated, "tools": [tool]}
    # ShareGPT's column: conversations of {"from", "value"}
    shared = [{"id": "share", "conversations": [{"from": "human", "value": "Who are you?"}]}]
    datasets.Dataset.from_list(shared).save_to_disk(str(tmp_path / "share"))
    argv = ["explain-dataset", tmp_path / "share", "--model", "tiny-llama", "--no-ray",
            "--budget", "20", "--max-new-tokens", "2", "--out", tmp_path / "s"]  # fmt: skip
    code, _, err = run(argv, capsys)
    assert code == 0, err
    saved = MultimodalLLMAttributionResult.load(tmp_path / "s" / "share" / "result.json")
    assert saved.input_tokens == ["Who", "are", "you"]


def test_remote_code_stays_off_unless_asked(monkeypatch, capsys, tmp_path):
    from captum_mllm import HFCausalLMAdapter

    seen = []

    def fake(name, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        raise OSError("offline")

    monkeypatch.setattr(HFCausalLMAdapter, "from_pretrained", fake)
    for extra in ([], ["--trust-remote-code"]):
        argv = ["explain", "--user", "Hi", "--model", "org/model", "--out", tmp_path, *extra]
        code, _, err = run(argv, capsys)
        assert code == 2 and "cannot load model" in err
    assert seen == [False, True]


def test_writes_only_under_the_given_paths_and_keeps_other_runs_stores(
    tmp_path, capsys, monkeypatch
):
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    out, store = tmp_path / "given" / "out", tmp_path / "given" / "run.sqlite"
    base = ["explain", "--model", "tiny-llama", "--budget", "20", "--out", out, "--store", store]
    code, _, err = run([*base, "--user", "Who are you, my friend?"], capsys)
    assert code == 0, err
    written = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert written and all(p.is_relative_to(tmp_path / "given") for p in written), written
    before = store.read_bytes()
    code, _, err = run([*base, "--user", "Another question entirely?"], capsys)
    assert code == 2 and "holds another explanation" in err
    assert store.read_bytes() == before  # the other run's store is left as it was


def test_chat_template_kwargs_reach_the_template(monkeypatch, tmp_path, capsys):
    from captum_mllm import HFCausalLMAdapter

    seen = []
    render = HFCausalLMAdapter._render

    def spy(self, messages, generation_prompt=False):
        seen.append(dict(self.chat_template_kwargs))
        return render(self, messages, generation_prompt)

    monkeypatch.setattr(HFCausalLMAdapter, "_render", spy)
    argv = ["explain", "--user", "Hi there", "--method", "exact", "--answer", "Hello",
            "--out", tmp_path, "--chat-template-kwargs"]  # fmt: skip
    code, _, err = run([*argv, '{"enable_thinking": false}', "--model", "tiny-llama"], capsys)
    assert code == 0, err
    assert seen and all(kwargs == {"enable_thinking": False} for kwargs in seen)
    for bad, says in (("[1]", "JSON object"), ("{nope", "not JSON"), ('{"tokenize": 1}', "set by")):
        code, _, err = run([*argv, bad, "--model", "tiny-llama"], capsys)
        assert code == 2 and says in err
    code, _, err = run([*argv, "{}", "--model", "tiny-lfm2-audio"], capsys)
    assert code == 2 and "Hugging Face" in err  # LFM2-Audio's prompt is its own: unread


def test_answer_is_read_where_the_template_puts_a_final_answer(tmp_path, capsys, monkeypatch):
    """--answer went in as target=, after the generation prompt: a Qwen3-style
    template (thinking on) puts an empty <think> block before a final answer."""
    import copy

    from conftest import THINKING_TEMPLATE

    from captum_mllm import Chat, ChatInput, HFCausalLMAdapter, MultimodalLLMAttribution
    from captum_mllm.cli import models
    from captum_mllm.methods import ExactShapleyValues
    from captum_mllm.testing import tiny_hf_adapter

    def thinking(name):
        plain = tiny_hf_adapter()
        tokenizer = copy.deepcopy(plain.tokenizer)
        tokenizer.chat_template = THINKING_TEMPLATE
        return HFCausalLMAdapter(plain.model, tokenizer)

    monkeypatch.setattr(models, "_tiny_model", thinking)
    code, _, err = run(
        ["explain", "--user", "Who are you, my friend?", "--model", "tiny-llama",
         "--method", "exact", "--answer", "I am a small model.", "--out", tmp_path],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    saved = MultimodalLLMAttributionResult.load(tmp_path / "result.json")
    model = thinking("tiny-llama")
    chat = Chat().user("Who are you, my friend?").assistant("I am a small model.")
    res = MultimodalLLMAttribution(ExactShapleyValues(model), model).attribute(
        ChatInput(chat, model)
    )
    assert saved.seq_attr.tolist() == pytest.approx(res.seq_attr.tolist(), abs=1e-6)


def test_counts_are_checked_before_a_model_loads(capsys, monkeypatch):
    """--budget 0 was refused only after the model had loaded and the chat was
    encoded (minutes for a 1.5B model)."""
    from captum_mllm.cli import models

    def no_model(*args):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(models, "_loaded", no_model)
    argv = ["explain", "--user", "Hi", "--model", "some/model"]
    for flag, bad in (("--budget", "0"), ("--batch", "-2"), ("--max-new-tokens", "0"),
                      ("--seed", "-1"), ("--budget", "ten"), ("--target-stderr", "0"),
                      ("--target-stderr", "nan")):  # fmt: skip
        code, _, err = run([*argv, flag, bad], capsys)
        assert code == 2 and f"argument {flag}" in err, err
    for method in ("exact", "captum-svs"):  # nothing to stop early
        code, _, err = run([*argv, "--method", method, "--target-stderr", "0.1"], capsys)
        assert code == 2 and "--target-stderr stops a sampler early" in err, err


def test_a_chat_file_may_be_an_object_holding_its_messages(tmp_path, capsys):
    """A data set's row or an OpenAI request, {"messages": [...]}, was refused."""
    messages = [{"role": "user", "content": "Who are you, my friend?"}]
    (tmp_path / "row.json").write_text(json.dumps({"messages": messages, "id": 7}))
    (tmp_path / "other.json").write_text(json.dumps({"turns": messages}))
    argv = ["explain", "--model", "tiny-llama", "--method", "exact", "--answer", "I am."]
    with pytest.warns(UserWarning, match=r"\['id'\] are not read"):  # dropped without a word
        code, _, err = run(
            [*argv, "--chat", tmp_path / "row.json", "--out", tmp_path / "o"], capsys
        )
    assert code == 0, err
    saved = MultimodalLLMAttributionResult.load(tmp_path / "o" / "result.json")
    assert saved.input_tokens == ["Who", "are", "you", "my", "friend"]
    code, _, err = run([*argv, "--chat", tmp_path / "other.json"], capsys)
    assert code == 2 and "must hold a list of messages" in err
    # A data set's file (its rows were read as messages: "each message must be a dict...")
    (tmp_path / "chats.json").write_text(json.dumps([{"id": "a", "messages": messages}]))
    code, _, err = run([*argv, "--chat", tmp_path / "chats.json"], capsys)
    assert code == 2 and f"holds a list of chats: explain-dataset {tmp_path / 'chats.json'}" in err
    # --budget went unread by --method exact; below its 2^5 coalitions it is refused.
    (tmp_path / "plain.json").write_text(json.dumps({"messages": messages}))
    code, _, err = run([*argv, "--chat", tmp_path / "plain.json", "--budget", "20"], capsys)
    assert code != 0 and "more than budget=20" in err
    # An OpenAI request's tools reach the chat template (they went unread); the
    # tiny model's template has no tool format, which a warning says.
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    (tmp_path / "request.json").write_text(json.dumps({"messages": messages, "tools": tools}))
    request = [*argv, "--chat", tmp_path / "request.json"]
    with pytest.warns(UserWarning, match=r"none of \['tools \(chat_template_kwargs\)'\]"):
        code, _, err = run([*request, "--out", tmp_path / "t"], capsys)
    assert code == 0, err
    saved = MultimodalLLMAttributionResult.load(tmp_path / "t" / "result.json")
    assert saved.provenance["input_settings"]["chat_template_kwargs"] == {"tools": tools}
    code, _, err = run([*request, "--chat-template-kwargs", json.dumps({"tools": []})], capsys)
    assert code == 2 and "give them once" in err
    # vLLM's chat_template_kwargs in a request reach the template too (a date to pin)
    dated = {"messages": messages, "chat_template_kwargs": {"date_string": "1 Jan 2025"}}
    (tmp_path / "dated.json").write_text(json.dumps(dated))
    code, _, err = run([*argv, "--chat", tmp_path / "dated.json", "--out", tmp_path / "d"], capsys)
    assert code == 0, err
    saved = MultimodalLLMAttributionResult.load(tmp_path / "d" / "result.json")
    assert saved.provenance["input_settings"]["chat_template_kwargs"] == {
        "date_string": "1 Jan 2025"
    }


def test_files_are_read_and_written_as_utf8_whatever_the_locale(tmp_path):
    """A chat file, a data set and the saved result were read and written in
    the platform's encoding: where it is not UTF-8 (Windows' cp1252, a C
    locale), a Chinese chat raised UnicodeEncodeError on saving its result,
    and on printing its features to such a console or file."""
    chat = [{"role": "user", "content": "东京在哪里？"}]
    (tmp_path / "chat.json").write_text(json.dumps(chat, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "chats.jsonl").write_text(
        json.dumps({"id": "east", "messages": chat}, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    script = (
        "import sys; from captum_mllm.cli import main\n"
        "main(['explain', '--chat', 'chat.json', '--model', 'tiny-llama', '--method', 'exact',"
        " '--answer', '东京。', '--out', 'one'])\n"
        "main(['report', 'one/result.json'])\n"
        "main(['explain-dataset', 'chats.jsonl', '--model', 'tiny-llama', '--no-ray',"
        " '--method', 'exact', '--max-new-tokens', '2', '--out', 'many'])\n"
    )
    ascii_locale = {"LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0",
                    "PYTHONIOENCODING": "ascii"}  # fmt: skip  # and a console that is not UTF-8
    (tmp_path / "run.py").write_text(script, encoding="utf-8")  # source files are UTF-8
    env = {**os.environ, **ascii_locale}
    done = subprocess.run([sys.executable, "run.py"], cwd=tmp_path, env=env, capture_output=True,
                          encoding="utf-8")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "answer: '\\u4e1c\\u4eac\\u3002'" in done.stdout  # printing raised too
    saved = (tmp_path / "one" / "result.json").read_text(encoding="utf-8")
    assert "东京" in saved  # written as UTF-8, not escaped away
    res = MultimodalLLMAttributionResult.load(tmp_path / "many" / "east" / "result.json")
    assert res.input_tokens and res.response_text is not None


def test_printed_tables_line_up_in_a_terminal(tmp_path, capsys):
    """pandas counted a Chinese character as one column, a terminal shows it
    in two: every row holding one stood a column out of line."""
    import unicodedata

    def columns(line):  # as a terminal counts them
        return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in line)

    argv = ["explain", "--user", "北京是首都吗 yes", "--model", "tiny-llama", "--method", "exact",
            "--answer", "是的", "--out", tmp_path]  # fmt: skip
    code, out, err = run(argv, capsys)
    assert code == 0, err
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("feature"))
    table = lines[start : start + 8]  # the header and seven features
    assert any("北" in line for line in table) and any("yes" in line for line in table)
    assert len({columns(line) for line in table}) == 1, table


def test_characters_no_font_holds_are_named_once_not_once_a_glyph(tmp_path, capsys, monkeypatch):
    """On a machine without a Chinese font, matplotlib's warnings (one a
    character, font and drawing: 37 lines for one question) buried the table."""
    import warnings

    from captum_mllm.viz import fonts

    monkeypatch.setattr(fonts, "_regular_fonts", lambda: [])
    monkeypatch.setattr(fonts, "_WARNED", set())
    argv = ["explain", "--user", "北京 yes", "--model", "tiny-llama", "--method", "exact",
            "--answer", "是", "--out", tmp_path]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run(argv, capsys)
    assert code == 0, err
    assert not [w for w in caught if "missing from font" in str(w.message)]
    said = [str(w.message) for w in caught if "no installed font" in str(w.message)]
    named = [message.split(":")[0].split()[4:] for message in said]
    assert sorted(sum(named, [])) == sorted("北京是")  # each character once, in few lines
