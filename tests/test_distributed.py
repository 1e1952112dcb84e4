"""Explaining a data set over Ray actors (local Ray, CPU actors, tiny model)."""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import os
import threading
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import ray
import torch
from captum.attr import ShapleyValueSampling

from captum_mllm import (
    Chat,
    ChatInput,
    EmbeddingSimilarity,
    MultimodalLLMAttribution,
    MultimodalLLMAttributionResult,
    ray_pool,
)
from captum_mllm.chat_explainer import REPORT, RESULT, STORE, ChatExplainer
from captum_mllm.dataset_tables import dataset_attributions
from captum_mllm.distributed import explain_dataset, explain_sharded
from captum_mllm.errors import InvalidOptionError, StoreMismatchError, TargetError
from captum_mllm.methods import ExactShapleyValues, LeverageKernelShap, PairedPermutationSampling
from captum_mllm.testing import tiny_hf_adapter

QUESTIONS = [
    "Who are you?",
    "What is the sky made of today?",
    "Tell me a story about a cat",
    "Where is the nearest train station?",
    "Why do birds sing in the morning?",
    "How far away is the moon?",
]
CHATS = [Chat().system("Be brief.").user(q) for q in QUESTIONS]
SETTINGS = {"budget": 60, "seed": 0, "gen_args": {"max_new_tokens": 4}}


factory = tiny_hf_adapter  # importable by the workers (a test module is not)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("in_process")
    explain_dataset(
        CHATS, factory, LeverageKernelShap, {}, SETTINGS, store_dir=root, use_ray=False,
        show_progress=False,
    )  # fmt: skip
    return root


def _same_results(a, b, names):
    for name in names:
        x = MultimodalLLMAttributionResult.load(a / name / RESULT)
        y = MultimodalLLMAttributionResult.load(b / name / RESULT)
        assert x.response_text == y.response_text
        torch.testing.assert_close(torch.as_tensor(x.seq_attr), torch.as_tensor(y.seq_attr))
        torch.testing.assert_close(torch.as_tensor(x.token_attr), torch.as_tensor(y.token_attr))


def test_two_actors_give_the_in_process_results(tmp_path, local_ray, in_process):
    table = explain_dataset(
        CHATS, factory, LeverageKernelShap, {}, SETTINGS, store_dir=tmp_path, num_workers=2,
        resources_per_worker={"num_cpus": 1}, show_progress=False,
    )  # fmt: skip
    assert list(table["chat"]) == [f"chat_{i:05d}" for i in range(6)]
    assert (table["n_unique_coalitions"] > 0).all()
    _same_results(tmp_path, in_process, table["chat"])


def _kill_first_mid_run(root, killed: list[int] | None = None):
    """An on_worker_start that kills the first actor once a chat is being
    evaluated (its store exists under ``root``)."""

    def start(actors):
        def watch():
            end = time.time() + 60
            while time.time() < end and not any(root.glob(f"*/{STORE}")):
                time.sleep(0.01)
            ray.kill(actors[0])
            if killed is not None:
                killed.append(1)

        threading.Thread(target=watch, daemon=True).start()

    return start


def test_a_killed_actor_loses_nothing_and_a_rerun_evaluates_nothing(
    tmp_path, local_ray, in_process
):
    killed: list[int] = []
    table = explain_dataset(
        CHATS, factory, LeverageKernelShap, {}, SETTINGS, store_dir=tmp_path, num_workers=2,
        resources_per_worker={"num_cpus": 1}, show_progress=False,
        on_worker_start=_kill_first_mid_run(tmp_path, killed),
    )  # fmt: skip
    assert killed and table["retries"].sum() >= 1
    assert len(table) == 6
    _same_results(tmp_path, in_process, table["chat"])

    again = explain_dataset(
        CHATS, factory, LeverageKernelShap, {}, SETTINGS, store_dir=tmp_path, num_workers=2,
        show_progress=False,
    )  # fmt: skip
    assert again["skipped"].all() and len(again) == 6


def test_sharegpt_rows_are_explained_as_their_messages(tmp_path):
    """A ShareGPT row {"conversations": [{"from", "value"}]} was iterated as
    messages and refused; its key also warned as not read."""
    rows = {"share": {"conversations": [{"from": "human", "value": QUESTIONS[0]}]},
            "plain": [{"role": "user", "content": QUESTIONS[0]}]}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is "not read"
        explain_dataset(rows, factory, ExactShapleyValues, {}, {"target": "Yes."},
                        store_dir=tmp_path, use_ray=False, show_progress=False)  # fmt: skip
    share, plain = (MultimodalLLMAttributionResult.load(tmp_path / k / RESULT) for k in rows)
    assert share.input_tokens == plain.input_tokens
    assert torch.equal(share.seq_attr, plain.seq_attr)


def test_a_data_sets_id_column_names_its_chats(tmp_path):
    """A datasets.Dataset's rows were named chat_00000, ... and their "id"
    warned as not read, where the command line names a row by its id."""
    import datasets

    rows = datasets.Dataset.from_list(
        [{"id": "sky", "messages": [{"role": "user", "content": QUESTIONS[1]}]},
         {"id": None, "messages": [{"role": "user", "content": QUESTIONS[0]}]}]
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is "not read"
        table = explain_dataset(rows, factory, ExactShapleyValues, {}, {"target": "Yes."},
                                store_dir=tmp_path, use_ray=False, show_progress=False)  # fmt: skip
    assert table["chat"].tolist() == ["sky", "chat_00001"]
    assert (tmp_path / "sky" / RESULT).is_file()
    page = (tmp_path / "sky" / REPORT).read_text(encoding="utf-8")  # a page to read it by
    assert QUESTIONS[1].split()[-1].strip("?") in page
    twice = [{"id": 7, "messages": [{"role": "user", "content": q}]} for q in QUESTIONS[:2]]
    with pytest.raises(InvalidOptionError, match=r"\['7'\] name several chats"):
        explain_dataset(twice, factory, ExactShapleyValues, {}, {"target": "Yes."},
                        store_dir=tmp_path, use_ray=False, show_progress=False)  # fmt: skip


def test_a_data_sets_own_columns_are_kept_in_its_summary(tmp_path):
    """A labelled data set's label and category were dropped from the summary
    (and warned as not read): grouping attributions by label needed a join."""
    rows = pd.DataFrame(
        [{"id": "sky", "messages": [{"role": "user", "content": QUESTIONS[1]}], "label": "science",
          "difficulty": 2, "temperature": 0.7, "response": "Air.", "meta": {"by": "me"},
          "feature_index": 9, "role": "x"},
         {"id": "cat", "messages": [{"role": "user", "content": QUESTIONS[2]}], "label": "story",
          "difficulty": None, "temperature": 0.7, "response": "Once.", "meta": {"by": "me"}}]
    )  # fmt: skip
    run = functools.partial(
        explain_dataset, rows, factory, ExactShapleyValues, {}, {"target": "Yes."},
        store_dir=tmp_path, use_ray=False, show_progress=False,
    )  # fmt: skip
    # a generation setting, a list or mapping, and a summary column's name are not kept
    with pytest.warns(UserWarning, match=r"keys \['meta', 'response', 'temperature'\] are not"):
        table = run()
    assert list(table.columns[:3]) == ["chat", "label", "difficulty"]
    assert table["label"].tolist() == ["science", "story"]
    assert table["response"].tolist() != ["Air.", "Once."]  # the model's answers
    saved = pd.read_csv(tmp_path / "summary.csv")
    assert saved["label"].tolist() == ["science", "story"] and saved["difficulty"][0] == 2
    features = pd.read_csv(tmp_path / "attributions.csv")  # each feature's row has them too
    assert list(features.columns[:4]) == ["chat", "label", "difficulty", "feature_index"]
    assert features["feature_index"][0] == 0 and features["role"][0] == "user"  # theirs win
    by_label = features.groupby("label")["seq_attr"].sum()
    sky = MultimodalLLMAttributionResult.load(tmp_path / "sky" / RESULT)
    assert by_label["science"] == pytest.approx(float(sky.seq_attr.sum()), rel=1e-4)
    again = dataset_attributions(tmp_path)  # the folder read back, as it was written
    assert again[["chat", "label"]].equals(features[["chat", "label"]])
    with pytest.warns(UserWarning, match="are not read"):
        rerun = run()  # skipped chats keep their columns too
    assert rerun["skipped"].all() and rerun["label"].tolist() == ["science", "story"]
    plain = explain_dataset(  # chats without columns: the summary as before
        {"sky": rows["messages"][0]}, factory, ExactShapleyValues, {}, {"target": "Yes."},
        store_dir=tmp_path, use_ray=False, show_progress=False,
    )  # fmt: skip
    assert list(plain.columns[:2]) == ["chat", "response"]


def test_a_tables_rows_are_its_chats_as_a_list_of_them_would_be(tmp_path):
    """Iterating a pandas DataFrame gives its column names: each was read as a
    chat and refused ("a chat is a list of messages, got a str"). A
    datasets.Dataset gave each row's tools every key of every row's tools, None
    where it had none (a schema read "description": null)."""
    import datasets

    dated = {"date_string": "1 Jan 2025"}
    described = {"type": "function", "function": {"name": "sky", "description": "Its colour"}}
    bare = {"type": "function", "function": {"name": "time"}}
    rows = [
        {"id": "sky", "messages": [{"role": "user", "content": QUESTIONS[1]}],
         "chat_template_kwargs": dated, "tools": [described]},
        {"id": "why", "messages": [{"role": "user", "content": QUESTIONS[0]}],
         "tools": [bare]},
        {"id": "how", "messages": [{"role": "user", "content": QUESTIONS[2]}]},
    ]  # fmt: skip
    pd.DataFrame(rows).to_parquet(tmp_path / "chats.parquet")
    run = functools.partial(
        explain_dataset, model_factory=factory, method_factory=ExactShapleyValues,
        attribute_kwargs={"target": "Yes."}, store_dir=tmp_path / "runs", use_ray=False,
        show_progress=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is "not read"
        warnings.filterwarnings("ignore", "the model's chat template renders none of")
        table = run(pd.DataFrame(rows))
        assert table["chat"].tolist() == ["sky", "why", "how"] and not table["skipped"].any()
        assert run(rows)["skipped"].all()  # the same requests as the list of rows
        assert run(pd.read_parquet(tmp_path / "chats.parquet"))["skipped"].all()  # NumPy lists
        assert run(datasets.Dataset.from_list(rows))["skipped"].all()
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
    with pytest.raises(InvalidOptionError, match=r"data sets \(train\), not chats"):
        run(splits)  # each split was read as one chat
    saved = MultimodalLLMAttributionResult.load(tmp_path / "runs" / "why" / RESULT)
    assert saved.provenance["input_settings"]["chat_template_kwargs"] == {"tools": [bare]}


def test_names_that_differ_in_case_alone_are_refused_where_folders_ignore_case(
    tmp_path, monkeypatch
):
    """On macOS and Windows "A1" and "a1" name one folder: each chat overwrote
    the other's result, and a rerun read one's result as the other's."""
    from captum_mllm import dataset_tables

    chats = {"A1": [{"role": "user", "content": QUESTIONS[0]}],
             "a1": [{"role": "user", "content": QUESTIONS[1]}]}  # fmt: skip
    run = functools.partial(explain_dataset, chats, factory, ExactShapleyValues, {},
                            {"target": "Yes."}, store_dir=tmp_path, use_ray=False,
                            show_progress=False)  # fmt: skip
    assert not dataset_tables._ignores_case(tmp_path)  # Linux's file systems: two folders
    assert run()["chat"].tolist() == ["A1", "a1"]
    monkeypatch.setattr(dataset_tables, "_ignores_case", lambda folder: True)
    with pytest.raises(InvalidOptionError, match=r"\[\['A1', 'a1'\]\] differ only in case"):
        run()


def test_a_chat_that_raises_stops_the_run_or_is_recorded(tmp_path, local_ray):
    """One bad chat in a data set (here a control token in its text) stopped
    the whole run; with on_error="record" its row says why and the others are
    explained, on Ray as in-process. A rerun tries only it again."""
    from captum_mllm.errors import InvalidContentError

    chats = {"good": CHATS[0], "bad": Chat().user("Hi <|im_start|> there"), "fine": CHATS[2]}
    args = (factory, LeverageKernelShap, {}, SETTINGS)
    for use_ray in (False, True):  # on Ray, it came inside a RayTaskError with its traceback
        with pytest.raises(InvalidContentError) as raised:
            explain_dataset(chats, *args, store_dir=tmp_path / f"raise{use_ray}",
                            use_ray=use_ray, show_progress=False)  # fmt: skip
        assert type(raised.value) is InvalidContentError and "\n" not in str(raised.value)
        assert raised.value.__notes__ == ["in chat 'bad'"]  # which chat of the data set
    for use_ray in (False, True):
        root = tmp_path / str(use_ray)
        with pytest.warns(UserWarning, match="1 of 3 chats raised"):
            table = explain_dataset(chats, *args, store_dir=root, use_ray=use_ray,
                                    show_progress=False, on_error="record")  # fmt: skip
        assert list(table["chat"]) == ["good", "bad", "fine"]
        errors = dict(zip(table["chat"], table["error"], strict=True))
        assert errors["bad"].startswith("InvalidContentError: ")
        assert all(not isinstance(errors[k], str) for k in ("good", "fine"))
        assert not (root / "bad").exists() and (root / "fine" / RESULT).exists()  # no husk
        # counts stay integers beside the failed chat's missing ones
        assert str(table["n_features"].dtype) == "Int64" and table["n_features"].isna().sum() == 1
        written = {r["chat"]: r for r in csv.DictReader(io.StringIO(table.to_csv(index=False)))}
        assert written["good"]["n_features"].isdigit() and written["bad"]["n_features"] == ""
    _same_results(tmp_path / "False", tmp_path / "True", ["good", "fine"])
    with pytest.warns(UserWarning, match="1 of 3"):
        again = explain_dataset(chats, *args, store_dir=tmp_path / "False", use_ray=False,
                                show_progress=False, on_error="record")  # fmt: skip
    assert list(again["skipped"]) == [True, False, True]
    with pytest.raises(InvalidOptionError, match="on_error"):
        explain_dataset(chats, *args, store_dir=tmp_path, on_error="skip")


def test_a_chat_whose_worker_dies_past_its_retries_is_recorded(tmp_path, local_ray):
    """on_error="record" named a chat that raised but stopped the run when a
    chat's worker died more than max_retries times (out of memory, say)."""
    with pytest.warns(UserWarning, match="1 of 6 chats raised"):
        table = explain_dataset(
            CHATS, factory, LeverageKernelShap, {}, SETTINGS, store_dir=tmp_path,
            num_workers=2, resources_per_worker={"num_cpus": 1}, show_progress=False,
            on_worker_start=_kill_first_mid_run(tmp_path), max_retries=0, on_error="record",
        )  # fmt: skip
    died = table[table["error"].notna()]
    assert len(table) == 6 and len(died) == 1
    assert died["error"].iloc[0].endswith("Error: its worker died on every try (1)")
    assert sum((tmp_path / name / RESULT).exists() for name in table["chat"]) == 5


def test_sharding_one_explanation_over_two_actors(tmp_path, local_ray):
    chat = Chat().system("Be brief.").user("Please explain why the sky is blue to me")
    res = explain_sharded(
        chat, factory, ExactShapleyValues, {}, {"gen_args": {"max_new_tokens": 4}},
        store=tmp_path / "shared.sqlite", num_shards=2, resources_per_worker={"num_cpus": 1},
    )  # fmt: skip
    assert res.n_unique_coalitions == 0  # every coalition came from the shards' store
    shards = [_keys(tmp_path / f"shared.shard{i}of2.sqlite") for i in (1, 2)]
    assert shards[0] and shards[1] and not shards[0] & shards[1]  # each worker its own file
    assert shards[0] | shards[1] == _keys(tmp_path / "shared.sqlite")
    model = factory()
    inp = ChatInput(chat, model)
    alone = MultimodalLLMAttribution(ExactShapleyValues(model), model).attribute(
        inp, gen_args={"max_new_tokens": 4}
    )
    assert res.n_stored_coalitions == 2**inp.n_itp_features
    torch.testing.assert_close(res.seq_attr, alone.seq_attr)
    torch.testing.assert_close(res.token_attr, alone.token_attr)


def _within(seconds, call):
    """call()'s value (or its error), or a failure when it has not returned in ``seconds``."""
    out: list = []

    def run():
        try:
            out.append((call(), None))
        except Exception as exc:  # raised in the caller's thread below
            out.append((None, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert out, f"still waiting after {seconds} s"
    value, error = out[0]
    if error is not None:
        raise error
    return value


def test_more_workers_than_the_cluster_runs_at_once_finish(tmp_path, local_ray, in_process):
    """Two two-CPU workers on two CPUs: the one without room waited for the
    other, which waited for it, for ever."""
    table = _within(240, lambda: explain_dataset(
        CHATS[:3], factory, LeverageKernelShap, {}, SETTINGS, store_dir=tmp_path / "data",
        num_workers=2, resources_per_worker={"num_cpus": 2}, show_progress=False,
    ))  # fmt: skip
    assert len(table) == 3 and not table["skipped"].any()
    _same_results(tmp_path / "data", in_process, table["chat"])
    chat = Chat().system("Be brief.").user("Why is the sky blue?")
    res = _within(240, lambda: explain_sharded(
        chat, factory, ExactShapleyValues, {}, {"gen_args": {"max_new_tokens": 4}},
        store=tmp_path / "shared.sqlite", num_shards=2, resources_per_worker={"num_cpus": 2},
    ))  # fmt: skip
    assert res.n_unique_coalitions == 0 and res.n_stored_coalitions == 2**5


def test_workers_the_cluster_cannot_hold_are_refused(tmp_path, local_ray, monkeypatch):
    """A GPU worker on a CPU cluster was waited for without a word, for ever."""
    with pytest.raises(InvalidOptionError, match="asks for GPU 1 and the Ray cluster holds GPU 0"):
        _within(60, lambda: explain_dataset(
            CHATS[:1], factory, LeverageKernelShap, store_dir=tmp_path,
            resources_per_worker={"num_gpus": 1}, show_progress=False,
        ))  # fmt: skip
    with pytest.raises(InvalidOptionError, match="asks for CPU 3 and the Ray cluster holds CPU 2"):
        _within(60, lambda: explain_sharded(
            CHATS[0], factory, ExactShapleyValues, store=tmp_path / "s.sqlite",
            resources_per_worker={"num_cpus": 3},
        ))  # fmt: skip
    # A local cluster started here holds what its workers ask for (it held one
    # CPU a worker, so two-CPU workers never started)
    started: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: started.append(kwargs))
    ray_pool.start_ray(None, 3, {"num_cpus": 2})
    ray_pool.start_ray(None, 3, None)
    assert [kw["num_cpus"] for kw in started] == [6, 3]


def test_a_worker_that_cannot_build_its_model_stops_the_run_in_a_line(tmp_path, local_ray):
    """A mistyped model: Ray restarted the worker for each retry of each chat
    (minutes, on the hub's time-outs), then raised its traceback as text."""
    from captum_mllm.cli.models import load_model
    from captum_mllm.cli.usage import UsageError
    from captum_mllm.errors import InvalidModelError

    missing = functools.partial(os.stat, "/nonexistent/model")  # raises FileNotFoundError
    started = time.time()
    with pytest.raises(InvalidModelError, match="could not build its model: FileNotFound"):
        explain_dataset(
            CHATS[:3],
            missing,
            LeverageKernelShap,
            store_dir=tmp_path,
            show_progress=False,
            on_error="record",
        )  # no chat can be: it stops
    with pytest.raises(InvalidModelError, match="could not build its model: FileNotFound"):
        explain_sharded(CHATS[0], missing, ExactShapleyValues, store=tmp_path / "s.sqlite")
    cli_model = functools.partial(load_model, "./no-such-model", None, None, None)
    with pytest.raises(UsageError, match="^no model folder or file at ./no-such-model$"):
        explain_dataset(CHATS[:3], cli_model, LeverageKernelShap, store_dir=tmp_path,
                        show_progress=False)  # fmt: skip
    assert time.time() - started < 60  # a worker a try: 3 retries of 3 chats took longer


def test_a_shard_whose_worker_dies_goes_to_a_fresh_one(tmp_path, local_ray):
    """explain_dataset retried a chat whose worker died; explain_sharded
    raised Ray's RayActorError for a shard's."""
    marker = tmp_path / "died"

    def dies_once(model):  # the worker's process ends in its first shard
        if not marker.exists():
            marker.write_text("")
            os._exit(1)
        return ExactShapleyValues(model)

    chat = Chat().user("Why is the sky so blue?")
    res = explain_sharded(
        chat, factory, dies_once, {}, {"gen_args": {"max_new_tokens": 4}},
        store=tmp_path / "shared.sqlite", num_shards=1,
    )  # fmt: skip
    assert marker.exists() and res.n_stored_coalitions == 2**6
    model = factory()
    alone = MultimodalLLMAttribution(ExactShapleyValues(model), model).attribute(
        ChatInput(chat, model), gen_args={"max_new_tokens": 4}
    )
    torch.testing.assert_close(res.seq_attr, alone.seq_attr)
    marker.unlink()
    with pytest.raises(ray.exceptions.RayActorError):
        explain_sharded(
            chat, factory, dies_once, store=tmp_path / "s.sqlite", num_shards=1, max_retries=0
        )


def test_without_ray_it_runs_in_process_with_a_note(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("no ray here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.warns(UserWarning, match=r"captum-mllm\[ray\]"):
        table = explain_dataset(
            CHATS[:2], factory, LeverageKernelShap, {}, SETTINGS, store_dir=tmp_path,
            show_progress=False,
        )  # fmt: skip
    assert len(table) == 2 and (tmp_path / "chat_00001" / RESULT).is_file()


def test_gen_args_reach_only_the_chats_without_an_answer(tmp_path):
    # attribute refuses gen_args beside a chat's own answer, so a data set with
    # any answered chat failed as a whole
    answered = CHATS[1].assistant("Air and light.")
    explain_dataset(
        {"asked": CHATS[0], "answered": answered}, factory, LeverageKernelShap, {}, SETTINGS,
        store_dir=tmp_path, use_ray=False, show_progress=False,
    )  # fmt: skip
    res = MultimodalLLMAttributionResult.load(tmp_path / "answered" / RESULT)
    assert res.response_text == "Air and light."
    model = factory()
    alone = MultimodalLLMAttribution(LeverageKernelShap(model), model).attribute(
        ChatInput(answered, model), budget=60, seed=0
    )
    torch.testing.assert_close(torch.as_tensor(res.seq_attr), alone.seq_attr)
    asked = MultimodalLLMAttributionResult.load(tmp_path / "asked" / RESULT)
    assert len(asked.output_tokens) <= 4  # its answer generated with the gen_args given


def test_a_chats_foil_makes_its_explanation_contrastive(tmp_path):
    """A data set of answers and foils ({"messages": ..., "foil": ...}): each
    chat with a foil weighs its answer against it (ContrastiveTarget), and the
    foil is a summary column and part of the request a rerun compares."""
    from captum_mllm import ContrastiveTarget

    answered = [
        {"role": "user", "content": "Which city?"},
        {"role": "assistant", "content": "Paris."},
    ]
    chats = {"plain": {"messages": answered}, "versus": {"messages": answered, "foil": "Lyon."}}
    kwargs = {"store_dir": tmp_path, "use_ray": False, "show_progress": False}
    table = explain_dataset(chats, factory, ExactShapleyValues, **kwargs)
    assert table.set_index("chat")["foil"].isna().tolist() == [True, False]
    model = factory()
    attr = MultimodalLLMAttribution(
        ExactShapleyValues(model), model, target=ContrastiveTarget("Lyon.")
    )
    alone = attr.attribute(ChatInput(answered, model))
    res = MultimodalLLMAttributionResult.load(tmp_path / "versus")
    torch.testing.assert_close(torch.as_tensor(res.seq_attr), alone.seq_attr)
    assert res.provenance["target"]["foil"] == "Lyon."
    plain = MultimodalLLMAttributionResult.load(tmp_path / "plain")
    assert plain.provenance["target"]["class"] == "LogProbTarget"
    table = explain_dataset(chats, factory, ExactShapleyValues, **kwargs)
    assert table["skipped"].all()  # the same requests
    chats["versus"]["foil"] = "Rome."  # another request, and its store another target's
    with pytest.raises(StoreMismatchError):
        explain_dataset(chats, factory, ExactShapleyValues, **kwargs)
    for bad, match in [(3, "foil is the other answer's text"), ("Paris.", "explained answer")]:
        chats["versus"]["foil"] = bad
        with pytest.raises((InvalidOptionError, TargetError), match=match):
            explain_dataset(chats, factory, ExactShapleyValues, **kwargs)
    chats["versus"]["foil"] = "Lyon."
    with pytest.raises(InvalidOptionError, match="target_factory names another"):
        explain_dataset(
            chats, factory, ExactShapleyValues, target_factory=EmbeddingSimilarity, **kwargs
        )


def test_a_worker_reads_its_replicas_weights_once(tmp_path, monkeypatch):
    """The stores' fingerprints read every weight again for each chat: seconds a
    chat for a billion-parameter model, more than a small budget's explanation."""
    import captum_mllm.fingerprint as fingerprint

    reads = []
    weights = fingerprint._weights
    monkeypatch.setattr(
        fingerprint, "_weights", lambda m, state: reads.append(m) or weights(m, state)
    )
    explain_dataset(
        CHATS[:3], factory, LeverageKernelShap, {}, SETTINGS, store_dir=tmp_path,
        use_ray=False, show_progress=False,
    )  # fmt: skip
    assert len(reads) == 1
    model = factory()  # the same weights, not a worker's: read for each explanation
    attr = MultimodalLLMAttribution(LeverageKernelShap(model), model)
    for _ in range(2):  # its store is the worker's: the fingerprints agree
        res = attr.attribute(ChatInput(CHATS[0], model), store=tmp_path / "chat_00000" / STORE,
                             **SETTINGS)  # fmt: skip
        assert res.n_unique_coalitions == 0 and res.n_stored_coalitions > 0  # all read
    assert len(reads) == 3


def _tool_model():
    import copy

    from conftest import TOOL_TEMPLATE

    from captum_mllm import HFCausalLMAdapter

    model = tiny_hf_adapter()
    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.chat_template = TOOL_TEMPLATE
    return HFCausalLMAdapter(model.model, tokenizer)


def test_a_chats_own_tools_reach_the_template(tmp_path):
    """A row of an agents' data set holds its tools beside its messages, as an
    OpenAI request does; they went unread (no tool definitions in the prompt)."""
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    row = {"messages": CHATS[0].to_messages(), "tools": tools}
    run = functools.partial(
        explain_dataset, {"row": row}, _tool_model, ExactShapleyValues, {}, {},
        store_dir=tmp_path, use_ray=False, show_progress=False,
    )  # fmt: skip
    run()
    saved = MultimodalLLMAttributionResult.load(tmp_path / "row" / RESULT)
    assert saved.provenance["input_settings"]["chat_template_kwargs"] == {"tools": tools}
    model = _tool_model()
    model.chat_template_kwargs = {"tools": tools}
    alone = MultimodalLLMAttribution(ExactShapleyValues(model), model).attribute(
        ChatInput(CHATS[0], model)
    )
    assert alone.response_text == saved.response_text
    torch.testing.assert_close(torch.as_tensor(saved.seq_attr), alone.seq_attr)
    assert run()["skipped"].all()  # the same request
    row["tools"] = [*tools, {"type": "function", "function": {"name": "time"}}]
    with pytest.raises(StoreMismatchError):  # other tools: another prompt, not its store
        run()
    # vLLM's chat_template_kwargs of a request are read as its tools are (they went
    # unread), and what is never read (an OpenAI request's model) is named
    row.update(tools=tools, chat_template_kwargs={"date_string": "1 Jan 2025"}, model="gpt")
    with pytest.warns(UserWarning, match=r"keys \['model'\] are not read"):
        explain_dataset(
            {"dated": row}, _tool_model, ExactShapleyValues, {}, {},
            store_dir=tmp_path, use_ray=False, show_progress=False,
        )  # fmt: skip
    saved = MultimodalLLMAttributionResult.load(tmp_path / "dated" / RESULT)
    settings = saved.provenance["input_settings"]["chat_template_kwargs"]
    assert settings == {"date_string": "1 Jan 2025", "tools": tools}


def test_an_index_page_links_every_explained_chat(tmp_path):
    """A data set's chats could be read only one report.html at a time, found
    by folder: index.html lists explain_dataset's table, each explained chat's
    name linking to its page (its name quoted as a URL, escaped as text); a
    chat that failed has no link and shows its error. summary.csv, which only
    the command line wrote, is written beside it."""
    from html.parser import HTMLParser
    from urllib.parse import unquote

    from captum_mllm.dataset_tables import INDEX, SUMMARY

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.links, self.cells, self.tags = {}, [], []
            self.href = None

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            self.href = dict(attrs).get("href") if tag == "a" else self.href

        def handle_data(self, data):
            if self.href is not None:
                self.links[data] = self.href
                self.href = None
            if self.tags and self.tags[-1] in ("td", "th", "a"):
                self.cells.append(data)

    name = "a b#1&<i>x"  # a data set's id: a folder name, not a URL or markup
    chats = {name: CHATS[0], "bad": Chat().user("Hi <|im_start|> there")}
    with pytest.warns(UserWarning, match="1 of 2 chats raised"):
        table = explain_dataset(
            chats, factory, LeverageKernelShap, {}, SETTINGS, store_dir=tmp_path,
            use_ray=False, show_progress=False, on_error="record",
        )  # fmt: skip
    page = Page()
    page.feed((tmp_path / INDEX).read_text(encoding="utf-8"))
    assert "i" not in page.tags  # the name's <i> is text
    assert page.links == {name: "a%20b%231%26%3Ci%3Ex/" + REPORT}
    assert (tmp_path / unquote(page.links[name])).is_file()
    assert list(table.columns) == page.cells[: len(table.columns)]
    assert table.set_index("chat").loc[name, "response"] in page.cells
    assert any(cell.startswith("InvalidContentError: ") for cell in page.cells)
    written = pd.read_csv(tmp_path / SUMMARY)  # the same table, for Python callers too
    assert list(written["chat"]) == list(table["chat"])
    assert list(written["n_features"].fillna(-1)) == list(table["n_features"].fillna(-1))


def test_a_spoken_chat_read_back_from_parquet_is_explained_as_its_rows(tmp_path):
    """pandas gives a Parquet file's lists as NumPy arrays: a clip's samples
    among them, which stay an array (a list of a clip's floats is slow to build)."""
    from importlib.resources import files

    import soundfile as sf

    from captum_mllm import LFM2AudioAdapter
    from captum_mllm.testing import tiny_lfm2_audio

    samples, rate = sf.read(str(files("captum_mllm") / "data" / "question.wav"), dtype="float32")
    clip = {"type": "audio", "audio": {"array": samples.tolist(), "sampling_rate": rate}}
    rows = [{"id": "spoken", "messages": [{"role": "user", "content": [clip]}]}]
    pd.DataFrame(rows).to_parquet(tmp_path / "chats.parquet")
    results = []
    for data in (rows, pd.read_parquet(tmp_path / "chats.parquet")):
        out = tmp_path / str(len(results))
        explain_dataset(data, lambda: LFM2AudioAdapter(*tiny_lfm2_audio()), ExactShapleyValues,
                        {"audio_unit": 0.5}, {"target": "Yes."}, store_dir=out, use_ray=False,
                        show_progress=False)  # fmt: skip
        results.append(MultimodalLLMAttributionResult.load(out / "spoken" / RESULT))
    assert {f.modality for f in results[1].features} == {"audio_in"}
    torch.testing.assert_close(results[1].seq_attr, results[0].seq_attr)


def test_a_data_sets_features_are_one_table(tmp_path):
    """A question about a whole data set (which modality, role or word counts)
    meant loading each chat's result.json: attributions.csv holds every chat's
    features, read back by dataset_attributions; a chat that raised has none."""
    from captum_mllm import dataset_attributions
    from captum_mllm.dataset_tables import ATTRIBUTIONS, SUMMARY

    chats = {"007": CHATS[0], "NA": CHATS[1], "bad": Chat().user("Hi <|im_start|> there")}
    with pytest.warns(UserWarning, match="1 of 3 chats raised"):
        explain_dataset(
            chats, factory, LeverageKernelShap, {}, SETTINGS, store_dir=tmp_path,
            use_ray=False, show_progress=False, on_error="record",
        )  # fmt: skip
    table = dataset_attributions(tmp_path)
    expected = []
    for name in ("007", "NA"):  # the names as given, not the numbers and NaN they read as
        own = MultimodalLLMAttributionResult.load(tmp_path / name / RESULT).to_dataframe()
        own = own.loc[:, :"seq_attr_stderr"]  # without the output tokens' columns
        expected.append(own.assign(chat=name, feature_index=range(len(own))))
    assert list(table.columns) == ["chat", "feature_index", *own.columns]
    expected = pd.concat(expected, ignore_index=True)[list(table.columns)]
    pd.testing.assert_frame_equal(table, expected)
    written = pd.read_csv(tmp_path / ATTRIBUTIONS, dtype={"chat": str}, keep_default_na=False)
    assert list(written["chat"]) == list(table["chat"])
    np.testing.assert_allclose(written["seq_attr"], table["seq_attr"], rtol=1e-6)
    (tmp_path / SUMMARY).unlink()  # a run stopped before it: the results written
    pd.testing.assert_frame_equal(dataset_attributions(tmp_path), table)
    with pytest.raises(InvalidOptionError, match="names a file explain_dataset writes"):
        explain_dataset({ATTRIBUTIONS: CHATS[0]}, factory, LeverageKernelShap, {}, SETTINGS,
                        store_dir=tmp_path, use_ray=False)  # fmt: skip


def test_a_rerun_skips_only_chats_explained_for_the_same_request(tmp_path):
    """A saved result is skipped only for the same chat, arguments and
    factories; otherwise the chat is explained again, from its store where the
    values still apply, or refused where the store holds another explanation."""
    chats = {"who": CHATS[0], "sky": CHATS[1]}

    def run(chats=chats, model=factory, **changes):
        return explain_dataset(
            chats, model, LeverageKernelShap, {}, {**SETTINGS, **changes}, store_dir=tmp_path,
            use_ray=False, show_progress=False,
        ).set_index("chat")  # fmt: skip

    first = run()
    again = run()
    assert again["skipped"].all()
    # a rerun's summary (summary.csv) keeps each result's figures: it had only the answer
    summary = ["response", "n_features", "top_feature", "n_unique_coalitions", "seconds"]
    pd.testing.assert_frame_equal(again[summary], first[summary])
    (tmp_path / "sky" / RESULT).with_suffix(".npz").unlink()  # its arrays lost: done again
    saved = json.loads((tmp_path / "who" / RESULT).read_text())
    saved["versions"]["captum-mllm"] = "0.0.1"  # after an upgrade: no warning a chat
    (tmp_path / "who" / RESULT).write_text(json.dumps(saved))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(run()["skipped"]) == [True, False]
    more = run(budget=40)  # another budget: explained again, from what is stored
    assert not more["skipped"].any() and (more["n_stored_coalitions"] > 0).all()
    assert MultimodalLLMAttributionResult.load(tmp_path / "sky" / RESULT).n_coalitions == 40
    assert run(budget=40)["skipped"].all()
    edited = {**chats, "sky": Chat().system("Be brief.").user("What is the sea made of?")}
    with pytest.raises(StoreMismatchError, match="chat"):
        run(edited, budget=40)
    with pytest.raises(StoreMismatchError, match="model"):
        run(model=functools.partial(factory, num_layers=1), budget=40)
    for name in ("../outside", "/tmp/outside", "a/b", "..", ""):  # e.g. a JSONL row's id
        with pytest.raises(InvalidOptionError, match="cannot name a folder"):
            run({name: CHATS[0]})
    for name in ("summary.csv", "Index.html"):
        with pytest.raises(InvalidOptionError, match="names a file explain_dataset writes"):
            run({name: CHATS[0]})
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["attributions.csv", "index.html", "sky", "summary.csv", "who"]


def test_a_request_names_factories_by_what_they_load():
    """What a rerun compares: a lambda's checkpoint name, a partial's
    arguments, paths by their text; never a repr's memory address."""
    from pathlib import Path

    from captum_mllm.fingerprint import plain

    def loader(name):
        return lambda: Path(name)  # a closure value

    assert plain(lambda: factory("a")) != plain(lambda: factory("b"))
    assert plain(loader("a")) != plain(loader("b"))
    assert plain(loader("a")) == plain(loader("a"))
    assert plain(functools.partial(factory, num_layers=1)) != plain(factory)
    assert plain({"store": Path("/x/y"), "aligner": object()}) == {
        "store": "/x/y",
        "aligner": "builtins.object",
    }


def _keys(store) -> set[bytes]:
    """The coalitions a store file holds."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(store)) as db:
        return {bytes(k) for (k,) in db.execute("SELECT key FROM coalitions")}


def test_sharding_in_process_and_its_refusals(tmp_path, monkeypatch):
    chat = Chat().user("Who are you, my friend?")
    # Ray's settings without Ray went unread
    with pytest.raises(InvalidOptionError, match="address are Ray's settings"):
        explain_sharded(chat, factory, LeverageKernelShap, store=tmp_path / "r.sqlite",
                        use_ray=False, address="auto")  # fmt: skip
    with pytest.raises(InvalidOptionError, match="num_workers, resources_per_worker"):
        explain_dataset(CHATS[:1], factory, LeverageKernelShap, store_dir=tmp_path / "d",
                        use_ray=False, num_workers=4,
                        resources_per_worker={"num_gpus": 1})  # fmt: skip
    # no worker started (no chat explained, no error), or an unsharded run
    with pytest.raises(InvalidOptionError, match="num_workers must be"):
        explain_dataset(CHATS[:1], factory, LeverageKernelShap, store_dir=tmp_path / "d",
                        num_workers=0)  # fmt: skip
    for own in ({"store": tmp_path / "x.sqlite"}, {"shard": (0, 2)}):  # a TypeError in a worker
        with pytest.raises(InvalidOptionError, match="are set here"):
            explain_dataset(CHATS[:1], factory, LeverageKernelShap, {}, own,
                            store_dir=tmp_path / "d", use_ray=False)  # fmt: skip
        with pytest.raises(InvalidOptionError, match="are set here"):
            explain_sharded(chat, factory, LeverageKernelShap, {}, own,
                            store=tmp_path / "r.sqlite", use_ray=False)  # fmt: skip
    with pytest.raises(InvalidOptionError, match="num_shards must be"):
        explain_sharded(chat, factory, LeverageKernelShap, store=tmp_path / "r.sqlite",
                        num_shards=0, use_ray=False)  # fmt: skip

    def unloadable():
        raise AssertionError("a model was loaded")

    # A method's bad argument raised in each chat's worker, after loading a model
    for method, bad in ((LeverageKernelShap, {"budget": -1}),
                        (LeverageKernelShap, {"n_samples": 9}),
                        (ShapleyValueSampling, {"n_sample": 9}),
                        (ShapleyValueSampling, {"n_samples": 0})):  # fmt: skip
        with pytest.raises((InvalidOptionError, TypeError)):
            explain_dataset(CHATS[:1], unloadable, method, {}, {"target": "Hi", **bad},
                            store_dir=tmp_path / "d", use_ray=False)  # fmt: skip
        with pytest.raises((InvalidOptionError, TypeError)):
            explain_sharded(chat, unloadable, method, {}, {"target": "Hi", **bad},
                            store=tmp_path / "r.sqlite", use_ray=False)  # fmt: skip
    res = explain_sharded(
        chat, factory, LeverageKernelShap, {}, {"budget": 20, "seed": 1},
        store=tmp_path / "s.sqlite", num_shards=3, use_ray=False,
    )  # fmt: skip
    # Each shard in a file of its own (SQLite's WAL needs a file's writers on one
    # machine: a file shared by a cluster's nodes is not), all merged into the store
    shards = [_keys(tmp_path / f"s.shard{i}of3.sqlite") for i in (1, 2, 3)]
    assert all(shards) and sum(map(len, shards)) == len(set().union(*shards))  # disjoint
    assert set().union(*shards) == _keys(tmp_path / "s.sqlite")
    # Another number of shards (or a store from before shard files) starts from the store
    evaluated = []
    evaluate_shard = ChatExplainer.evaluate_shard

    def counted(*args):
        evaluated.append(evaluate_shard(*args))
        return evaluated[-1]

    monkeypatch.setattr(ChatExplainer, "evaluate_shard", counted)
    again = explain_sharded(
        chat, factory, LeverageKernelShap, {}, {"budget": 20, "seed": 1},
        store=tmp_path / "s.sqlite", num_shards=2, use_ray=False,
    )  # fmt: skip
    assert evaluated == [0, 0] and again.n_unique_coalitions == 0
    torch.testing.assert_close(again.seq_attr, res.seq_attr)
    (tmp_path / "t.sqlite").write_text("not a store")
    with pytest.raises(StoreMismatchError, match="t.sqlite cannot be a coalition store"):
        explain_sharded(chat, factory, LeverageKernelShap, store=tmp_path / "t.sqlite",
                        use_ray=False)  # fmt: skip
    model = factory()
    alone = MultimodalLLMAttribution(LeverageKernelShap(model), model).attribute(
        ChatInput(chat, model), budget=20, seed=1
    )
    torch.testing.assert_close(res.seq_attr, alone.seq_attr)
    # Without seed=, samplers draw from torch's generator, seeded alike in every
    # worker: the shards evaluate the explanation's coalitions, the combining
    # run none (each shard drew its own before, and the combining run redid it).
    for method, kwargs in ((PairedPermutationSampling, {"budget": 30}),
                           (ShapleyValueSampling, {"n_samples": 3})):  # fmt: skip
        store = tmp_path / f"{method.__name__}.sqlite"
        res = explain_sharded(
            chat, factory, method, {}, kwargs, store=store, num_shards=3, use_ray=False, seed=5
        )
        assert res.n_unique_coalitions == 0 and res.n_stored_coalitions > 0
        with torch.random.fork_rng():
            torch.manual_seed(5)
            alone = MultimodalLLMAttribution(method(model), model).attribute(
                ChatInput(chat, model), **kwargs
            )
        torch.testing.assert_close(res.seq_attr, alone.seq_attr)
    attr = MultimodalLLMAttribution(LeverageKernelShap(model), model)
    with pytest.raises(InvalidOptionError, match="store"):
        attr.attribute(ChatInput(chat, model), shard=(0, 2))
    # A shard's counts: what it evaluated, and what it read from the store alone
    # (the other shards' coalitions were counted as read from the empty store).
    store, inp = tmp_path / "counts.sqlite", ChatInput(chat, model)
    exact = MultimodalLLMAttribution(ExactShapleyValues(model), model)
    first = exact.attribute(inp, target="Hi", store=store, shard=(0, 2))
    second = exact.attribute(inp, target="Hi", store=store, shard=(1, 2))
    assert first.n_stored_coalitions == 0
    assert second.n_stored_coalitions == first.n_unique_coalitions  # the first shard's
    assert first.n_unique_coalitions + second.n_unique_coalitions == 2**inp.n_itp_features
    calls = model.n_forward_calls
    for shard in ((2, 2), (-1, 2), (0, 0), (0.5, 2)):  # no coalition, or a ZeroDivisionError
        with pytest.raises(InvalidOptionError, match="0 <= index < count"):
            attr.attribute(ChatInput(chat, model), shard=shard, store=tmp_path / "x.sqlite")
    with pytest.raises(InvalidOptionError, match="store"):
        attr.attribute(ChatInput(chat, model), shard=(0, 2))
    assert model.n_forward_calls == calls  # refused before the answer is generated
