"""Plots of results (matplotlib)."""

from captum_mllm.viz.audio import plot_audio_attr
from captum_mllm.viz.labels import fit_heatmap, fit_margins, fit_tick_labels
from captum_mllm.viz.text import as_written

__all__ = ["as_written", "fit_heatmap", "fit_margins", "fit_tick_labels", "plot_audio_attr"]
