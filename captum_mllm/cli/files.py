"""Chats the command line reads from files: a message list (JSON, YAML), and
data sets (JSONL, JSON, Parquet, a ``datasets`` folder, an audio folder)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from captum_mllm.cli.usage import UsageError
from captum_mllm.errors import CaptumMLLMError, warn_caller


def read_dataset(path: Path, transcripts: bool) -> dict[str, Any]:
    """Named chats from a JSONL, JSON or Parquet file, a ``datasets`` folder, or
    an audio folder (whose transcripts go to each chat's ``ChatInput`` when
    ``transcripts``)."""
    if path.is_file() and path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UsageError("reading a Parquet file needs: pip install pyarrow") from None
        table = pq.read_table(path)
        return _table_chats(table.to_pylist(), table.column_names, str(path))
    if path.is_file():
        return _json_chats(path)
    if (path / "transcripts.csv").is_file():
        import pandas as pd

        table = pd.read_csv(path / "transcripts.csv")
        if not {"file", "transcript"} <= set(table.columns):
            raise UsageError(f"{path / 'transcripts.csv'} needs the columns file and transcript")
        out: dict[str, Any] = {}
        for i, row in enumerate(table.to_dict("records")):
            file = str(row["file"])
            content: list[dict[str, Any]] = [{"type": "audio", "path": str(path / file)}]
            text = row.get("text")
            if isinstance(text, str) and text:
                content.append({"type": "text", "text": text})
            own = {"transcripts": str(row["transcript"])} if transcripts else {}
            name = str(row.get("id", Path(file).stem))  # a/x.wav and b/x.wav: both "x"
            chat = {k: v for k, v in row.items() if k not in ("id", "text") and pd.notna(v)}
            chat.update(messages=[{"role": "user", "content": content}], input_kwargs=own)
            _add(out, name, chat, f"{path / 'transcripts.csv'} row {i + 1}")
        return out
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        try:
            import datasets
        except ImportError:
            raise UsageError(
                "reading a Hugging Face datasets folder needs: pip install datasets"
            ) from None
        data = datasets.load_from_disk(str(path))
        return _table_chats(data, data.column_names, str(path))
    raise UsageError(
        f"{path} is not a JSONL, JSON or Parquet file, a Hugging Face datasets folder or "
        "an audio folder with transcripts.csv"
    )


def _json_chats(path: Path) -> dict[str, Any]:
    """A JSONL file's chats, a line each, or a JSON file's: a list of chats (as
    ``json.dump`` writes a list, indented or not), an object naming each, or
    one chat."""
    try:  # utf-8-sig: a byte order mark (Windows' Notepad writes one) is not JSON
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(
            f"{path} is not UTF-8 text: give a JSONL, JSON or Parquet (.parquet) file"
        ) from None
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None  # JSON lines
    messages = (
        isinstance(whole, list)
        and whole
        and all(isinstance(m, dict) and "role" in m for m in whole)
    )
    named = (  # {name: chat}, as explain_dataset takes a mapping
        isinstance(whole, dict)
        and not {"messages", "conversations"} & set(whole)
        and all(isinstance(chat, list | dict) for chat in whole.values())
    )
    if named:
        return {str(name): chat for name, chat in whole.items()}
    if isinstance(whole, list) and not messages:
        rows = [(i, f"{path} item {i + 1}", row) for i, row in enumerate(whole)]
    elif whole is not None:  # one chat: a message list, or an object holding one
        rows = [(0, f"{path}", whole)]
    else:
        rows = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rows.append((i, f"{path} line {i + 1}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise UsageError(
                    f"{path} line {i + 1} is not JSON: {exc} (a JSONL file holds a chat a "
                    "line; a JSON file, a list of chats)"
                ) from None
    chats: dict[str, Any] = {}
    for i, where, row in rows:
        name = f"chat_{i:05d}"
        if isinstance(row, dict):  # its id names it; the rest is the chat
            row = dict(row)
            name = str(row.pop("id", name))
        _add(chats, name, row, where)
    return chats


def _table_chats(
    rows: Iterable[Mapping[str, Any]], columns: list[str], where: str
) -> dict[str, Any]:
    """Chats from a table's rows (a ``datasets`` folder, a Parquet file): its
    messages (or ShareGPT's conversations) column, the tools and
    chat_template_kwargs columns, an id column naming each, and its other
    columns (a label: ``explain_dataset`` keeps plain values in the summary)."""
    column = next((c for c in ("messages", "conversations") if c in columns), None)
    if column is None:
        raise UsageError(f"{where} has no messages or conversations column (it has {columns})")
    from captum_mllm.chat import REQUEST_KEYS
    from captum_mllm.dataset_tables import table_row

    out: dict[str, Any] = {}
    for i, row in enumerate(rows):
        r = table_row(row)
        chat = {k: v for k, v in r.items() if k not in (*REQUEST_KEYS, column, "id")}
        chat["messages"] = r[column]
        chat.update({k: r[k] for k in REQUEST_KEYS if k != "messages" and r.get(k)})
        _add(out, str(r.get("id", f"chat_{i:05d}")), chat, f"{where} row {i}")
    return out


def _add(chats: dict[str, Any], name: str, chat: Any, where: str) -> None:
    """Add a named chat; a repeated name would drop the chat before it."""
    if name in chats:
        raise UsageError(f"{where}: the chat name {name!r} is taken by an earlier chat")
    chats[name] = chat


def read_messages(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A Hugging Face message list from JSON or YAML (audio paths are relative
    to the file), and the chat-template arguments a request holding them adds
    (its tools and chat_template_kwargs; none for a plain list)."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # without a byte order mark
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            messages = yaml.safe_load(text)
        else:
            messages = json.loads(text)
    except Exception as exc:  # the parsers raise several types
        raise UsageError(
            f"{path} is not valid {path.suffix[1:].upper() or 'JSON'}: {exc}"
        ) from None
    template: dict[str, Any] = {}
    if isinstance(messages, dict) and isinstance(messages.get("messages"), list):
        from captum_mllm.chat import REQUEST_KEYS, request_template_kwargs

        # a data set's row, an OpenAI request: {"messages": [...], "tools": [...], ...}
        unread = sorted(set(messages) - set(REQUEST_KEYS))
        if unread:  # an OpenAI request's model, temperature, max_tokens
            warn_caller(f"{path}'s {unread} are not read (generation settings are flags)")
        try:
            template = request_template_kwargs(messages)
        except CaptumMLLMError as exc:
            raise UsageError(f"{path}: {exc}") from None
        messages = messages["messages"]
    if not isinstance(messages, list):
        raise UsageError(f"{path} must hold a list of messages, or an object with one")
    if any(isinstance(m, dict) and {"messages", "conversations"} & set(m) for m in messages):
        raise UsageError(  # a data set's rows: each was read as a message
            f"{path} holds a list of chats: explain-dataset {path} explains each, --chat one"
        )
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for item in content if isinstance(content, list) else []:
            for key in ("audio", "path"):
                value = item.get(key) if isinstance(item, dict) else None
                if isinstance(value, str) and not Path(value).is_absolute():
                    item[key] = str(path.parent / value)
    return messages, template
