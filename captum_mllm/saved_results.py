"""A result on disk: JSON for what reads as text, ``.npz`` beside it for the
arrays (no pickle), each file written whole under another name and then
renamed, read back with its schema and the versions that wrote it checked."""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from captum_mllm.audio import ClipRef
from captum_mllm.chat_features import FeatureInfo
from captum_mllm.errors import InconsistentVersionWarning, ResultFormatError
from captum_mllm.fingerprint import digest

if TYPE_CHECKING:
    from captum_mllm.result import MultimodalLLMAttributionResult

SCHEMA_VERSION = 1
_ARRAYS = (
    "seq_attr",
    "token_attr",
    "output_probs",
    "seq_attr_std",
    "seq_attr_stderr",
    "token_attr_stderr",
    "target_ids",
)
#: The file a result's folder holds.
RESULT_FILE = "result.json"
_COUNTS = ("n_model_calls", "n_coalitions", "n_unique_coalitions", "n_stored_coalitions")


def result_file(path: Path) -> Path:
    """``path``, or the result a folder holds (Errno 21 named the folder)."""
    if not path.is_dir():
        return path
    if (path / RESULT_FILE).is_file():
        return path / RESULT_FILE
    if any(path.glob(f"*/{RESULT_FILE}")):
        raise ResultFormatError(
            f"{path} is an explain_dataset folder (a result in each chat's folder): load one "
            f"chat's ({path / '<chat>'}), or every chat's features with "
            f"dataset_attributions({str(path)!r})"
        )
    raise ResultFormatError(f"no saved result in {path} (no {RESULT_FILE})")


def to_saved(
    result: MultimodalLLMAttributionResult, embed_audio: bool
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(data, arrays)``: see :meth:`MultimodalLLMAttributionResult.to_dict`."""
    arrays: dict[str, np.ndarray] = {}
    for name in _ARRAYS:
        value = getattr(result, name)
        if value is not None:
            arrays[name] = torch.as_tensor(value).detach().cpu().numpy()
    clips = []
    for i, clip in enumerate(result.clips or []):
        keep = embed_audio or clip.path is None or not Path(clip.path).is_file()
        samples = clip.samples().detach().cpu()
        if keep:
            arrays[f"clip_{i}"] = samples.numpy()
        clips.append({"turn": clip.turn, "sample_rate": clip.sample_rate,
                      "path": clip.path, "embedded": keep,
                      "sha256": None if keep else digest(samples)})  # fmt: skip
    audio = None
    if result.output_audio is not None:
        audio = {"sample_rate": result.output_audio.get("sample_rate")}
        for key in ("codes", "waveform"):
            if result.output_audio.get(key) is not None:
                arrays[f"output_audio_{key}"] = result.output_audio[key].detach().cpu().numpy()
    responses = result.responses
    data = {
        "schema_version": SCHEMA_VERSION,
        "versions": versions(),
        "input_tokens": list(result.input_tokens),
        "output_tokens": list(result.output_tokens),
        "features": [asdict(f) for f in result.features] if result.features is not None else None,
        "response_text": result.response_text,
        "responses": None if responses is None else [[list(k), v] for k, v in responses.items()],
        "roles": result.roles,
        "segments": result.segments,
        "clips": clips,
        "output_audio": audio,
        "provenance": result.provenance,
        "counts": {
            **{name: getattr(result, name) for name in _COUNTS},
            "wall_time": result.wall_time,
        },
    }
    return data, arrays


def write_saved(path: Path, data: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """``data`` as ``path`` and ``arrays`` as ``path`` with suffix ``.npz``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Each file written whole under another name, then renamed: a process
    # killed while saving (a data set's worker) left a cut .npz beside an
    # earlier JSON. The JSON goes last: it names the request a rerun checks.
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    os.replace(partial, path.with_suffix(".npz"))
    partial.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(partial, path)


def read_saved(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The JSON data and the arrays :func:`write_saved` wrote, checked: a missing
    or cut file and another schema raise, another captum-mllm version warns."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ResultFormatError(f"cannot read a saved result from {path}: {exc}") from exc
    if not isinstance(data, dict) or "schema_version" not in data:
        # read before the arrays: a missing .npz was named for another JSON file
        raise ResultFormatError(f"{path} is not a saved captum-mllm result")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ResultFormatError(
            f"{path} has schema version {data['schema_version']}; this captum-mllm "
            f"reads version {SCHEMA_VERSION}"
        )
    try:
        with np.load(path.with_suffix(".npz"), allow_pickle=False) as npz:
            arrays = {k: torch.from_numpy(npz[k].copy()) for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # missing or cut
        raise ResultFormatError(f"cannot read a saved result from {path}: {exc}") from exc
    saved = data.get("versions", {}).get("captum-mllm")
    if saved != versions()["captum-mllm"]:
        warnings.warn(
            f"{path} was saved by captum-mllm {saved}, read by {versions()['captum-mllm']}",
            InconsistentVersionWarning,
            stacklevel=3,  # the caller of MultimodalLLMAttributionResult.load
        )
    return data, arrays


def saved_fields(data: dict[str, Any], arrays: dict[str, Tensor]) -> dict[str, Any]:
    """The result's constructor arguments from what :func:`read_saved` read."""
    features = None
    if data["features"] is not None:
        features = [
            FeatureInfo(**{**f, "positions": tuple(f["positions"]),
                           "time": tuple(f["time"]) if f["time"] is not None else None})
            for f in data["features"]
        ]  # fmt: skip
    clips = [
        ClipRef(c["turn"], c["sample_rate"], arrays.get(f"clip_{i}"), c["path"], c.get("sha256"))
        for i, c in enumerate(data["clips"])
    ]
    audio = None
    if data["output_audio"] is not None:
        audio = {"sample_rate": data["output_audio"]["sample_rate"]}
        audio.update({k: arrays.get(f"output_audio_{k}") for k in ("codes", "waveform")})
    responses = None
    if data["responses"] is not None:
        responses = {tuple(k): v for k, v in data["responses"]}
    return {
        "input_tokens": data["input_tokens"],
        "output_tokens": data["output_tokens"],
        **{name: arrays.get(name) for name in _ARRAYS},
        "seq_attr": arrays["seq_attr"],
        "features": features,
        "response_text": data["response_text"],
        "responses": responses,
        "roles": data["roles"],
        "segments": data.get("segments"),
        "clips": clips,
        "output_audio": audio,
        "provenance": data["provenance"],
        **data["counts"],
    }


def versions() -> dict[str, str]:
    """Versions of the packages that made a result."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("captum-mllm", "captum", "torch", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out
