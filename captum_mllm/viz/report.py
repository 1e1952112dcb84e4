"""One self-contained HTML page for a result: no network, every text escaped.

The chat is drawn turn by turn, each feature coloured on Captum's red-white-
green scale centred on 0 (its value and standard error on hover), fixed text
greyed; each audio clip is a waveform strip with its features' spans, each
span playable on its own and the whole clip with the current span
highlighted (audio embedded as base64 FLAC). A table lists the features,
largest absolute value first. A selector switches both between the whole
answer and each output token's row of ``token_attr`` (with the token's
probability under the whole input, where the result has ``output_probs``).
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import math
import uuid
from importlib.resources import files
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from captum_mllm.viz.bidi import shown_controls

if TYPE_CHECKING:
    from captum_mllm.result import MultimodalLLMAttributionResult


_PIXELS_PER_SECOND = 150
#: A notebook frame's height (pixels) until the page reports its own.
FRAME_HEIGHT = 480


def render_report(result: MultimodalLLMAttributionResult) -> str:
    """The HTML page of :meth:`MultimodalLLMAttributionResult.to_html`."""
    rows = [torch.as_tensor(result.seq_attr).detach().cpu().float()]
    errors = None
    if result.token_attr is not None:
        rows += list(torch.as_tensor(result.token_attr).detach().cpu().float())
    if result.seq_attr_stderr is not None:
        errors = [torch.as_tensor(result.seq_attr_stderr).float()]
        if result.token_attr_stderr is not None:
            errors += list(torch.as_tensor(result.token_attr_stderr).float())
        if len(errors) != len(rows):
            errors = [errors[0]] * len(rows)
        if not any(e.ne(0).any() for e in errors):  # an exact method's: no "± 0" tips
            errors = None
    data = {
        "labels": [shown_controls(label) for label in result.input_tokens],
        "rows": [_json_numbers(r) for r in rows],
        "errors": [_json_numbers(e) for e in errors] if errors is not None else None,
        # the ranked table's turn column; a Captum input's features have none
        "where": [f"{f.turn} {f.role}" for f in result.features] if result.features else None,
    }
    audio = result.output_audio or {}
    answer_audio = None
    if audio.get("waveform") is not None:
        answer_audio = _flac(torch.as_tensor(audio["waveform"]).reshape(-1), audio["sample_rate"])
    return _template("report.html.j2").render(
        response=result.response_text or " ".join(result.output_tokens),
        foil=result.foil,
        answer_audio=answer_audio,
        outputs=list(result.output_tokens) if result.token_attr is not None else [],
        # how sure the model was of each token, under the whole input
        probs=[f"{float(p):.2g}" for p in result.output_probs]
        if result.output_probs is not None
        else None,
        turns=result.segments or [_plain_turn(result)],
        clips=[_clip(result, i) for i in range(len(result.clips or []))],
        meta=_meta(result),
        where=data["where"] is not None,
        has_errors=errors is not None,
        # inside <script>: no "</script>" or "<!--" can end it early
        data=json.dumps(data)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026"),
    )


def render_index(table: pd.DataFrame, links: dict[str, str]) -> str:
    """An HTML page listing a data set's chats (``explain_dataset``'s table),
    each chat's name linking to its page (``links``: name to relative URL)."""
    rows = []
    for record in table.to_dict("records"):
        row = {k: _cell(v) for k, v in record.items()}
        row["link"] = links.get(str(record["chat"]))
        rows.append(row)
    return _template("index.html.j2").render(columns=list(table.columns), rows=rows)


@functools.cache  # compiled once a process: a data set's pages took 20 ms each to compile
def _template(name: str) -> Any:
    """A page template of ``captum_mllm/viz``, every value escaped."""
    import jinja2

    env = jinja2.Environment(autoescape=True)
    # an override reversed the rest of a paragraph: each control is shown by name
    env.filters["shown"] = lambda value: shown_controls(str(value))
    return env.from_string((files("captum_mllm.viz") / name).read_text(encoding="utf-8"))


def _cell(value: Any) -> Any:
    """A summary value as the index shows it: missing ones empty, flags as words."""
    if isinstance(value, bool | np.bool_):
        return "yes" if value else ""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    return value.item() if isinstance(value, np.generic) else value


def framed(page: str, caption: str = "") -> str:
    """``page`` in a sandboxed frame, as a notebook shows a result, after a
    line of plain ``caption`` text: what remains where a notebook's viewer
    drops frames and scripts (GitHub's, nbconvert's PDF, untrusted outputs).

    A notebook puts an output's HTML into its own page: the report's styles
    restyled the whole notebook (its ``body`` rule narrowed it), and a second
    result's script, sharing the first's names and element ids, failed, which
    left that result uncoloured. In a frame it keeps its styles, ids and
    scripts to itself, and, sandboxed without the notebook's origin, it cannot
    reach the notebook. The frame takes the height the page reports (where the
    notebook runs the output's script; else it scrolls).
    """
    key = json.dumps(f"captum-mllm-{uuid.uuid4().hex}")  # earlier runs' outputs stay around
    # The listener comes first: a parser may stop inside a long page and let
    # the frame load and report before a script after it runs.
    return (
        '<script>window.addEventListener("message", (e) => {\n'
        f"  const frame = document.getElementById({key});\n"
        "  if (frame && e.source === frame.contentWindow && e.data?.height > 0)\n"
        "    frame.style.height = `${Math.ceil(e.data.height)}px`;\n"
        "});</script>\n"
        + (f'<p dir="auto">{html.escape(shown_controls(caption))}</p>\n' if caption else "")
        + f'<iframe id={key} title="captum-mllm explanation" sandbox="allow-scripts" '
        f'style="width: 100%; height: {FRAME_HEIGHT}px; border: 0" '
        f'srcdoc="{html.escape(page, quote=True)}"></iframe>'
    )


def _json_numbers(values: torch.Tensor) -> list[float | str]:
    """Values for JSON, which has no infinities or NaN (``json.dumps`` writes
    ``Infinity``, which the page's ``JSON.parse`` refuses): those as text."""
    return [v if math.isfinite(v) else str(v) for v in values.tolist()]


def _plain_turn(result: MultimodalLLMAttributionResult) -> dict[str, Any]:
    """Captum's own inputs have no chat: show their features in order."""
    runs = [[f"{label} ", i] for i, label in enumerate(result.input_tokens)]
    return {"role": "input", "parts": [{"text": runs}]}


def _clip(result: MultimodalLLMAttributionResult, index: int) -> dict[str, Any]:
    clip = (result.clips or [])[index]
    wave = clip.samples().detach().cpu().float()
    duration = len(wave) / clip.sample_rate
    width = max(300, int(duration * _PIXELS_PER_SECOND))
    scale = width / duration  # pixels per second (the strip scrolls when long)
    segments = []
    for f, feature in enumerate(result.features or []):
        if feature.clip == index and feature.time is not None:
            start, end = feature.time
            segments.append({
                "f": f, "start": round(start, 4), "end": round(end, 4), "label": feature.label,
                "x": round(start * scale, 1),
                "w": round(max(1.0, (end - start) * scale), 1),
            })  # fmt: skip
    return {"width": width, "segments": segments, "wave": _envelope(wave, width),
            "audio": _flac(wave, clip.sample_rate)}  # fmt: skip


def _envelope(wave: torch.Tensor, width: int) -> str:
    """Polyline points of the clip's peak envelope, one per pixel."""
    chunks = np.array_split(wave.abs().numpy(), width)
    peak = np.array([c.max() if len(c) else 0.0 for c in chunks])
    peak = peak / peak.max() if peak.max() > 0 else peak
    return " ".join(f"{x},{35 - 33 * p:.1f} {x},{35 + 33 * p:.1f}" for x, p in enumerate(peak))


def _flac(wave: torch.Tensor, sample_rate: int) -> str:
    """The clip as 16-bit FLAC, base64: lossless, about half a WAV's size for
    speech (a notebook keeps the page in its outputs), and every browser plays it."""
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, wave.numpy(), int(sample_rate), format="FLAC", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _meta(result: MultimodalLLMAttributionResult) -> list[tuple[str, Any]]:
    prov = result.provenance

    def listed(settings: dict[str, Any] | None) -> str:
        return ", ".join(f"{k}={v}" for k, v in (settings or {}).items())

    target = prov.get("target") or {}
    built = listed(prov.get("method_settings"))
    rows = [
        ("model", f"{prov.get('model_name') or prov.get('model', '?')}"),
        ("adapter", prov.get("adapter", "?")),
        ("method", f"{prov.get('method', '?')}({built})"),
        ("arguments", listed(prov.get("method_args"))),
        ("target", ", ".join(f"{k}={v}" for k, v in target.items())),
        ("coalitions", f"{result.n_unique_coalitions} evaluated of {result.n_coalitions} asked, "
                       f"{result.n_stored_coalitions} from the store"),
        ("model calls", result.n_model_calls),
        ("time", f"{result.wall_time:.2f} s"),
    ]  # fmt: skip
    return rows
