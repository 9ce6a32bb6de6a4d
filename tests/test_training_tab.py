"""The Training tab's layout at a 1280-pixel window: chart titles whole, the probe table's
columns within the width (issue 42)."""

from __future__ import annotations

import gradio as gr

from rlhf_chat.serving.ui import MAX_TITLE_CHARS, build_training


def test_chart_titles_fit_and_the_probe_table_has_fixed_column_widths():
    """Four plots share a row of a 1280-pixel window; a longer title was cut at both ends."""
    with gr.Blocks() as demo:
        build_training(None)
    plots = [b for b in demo.blocks.values() if isinstance(b, (gr.LinePlot, gr.ScatterPlot))]
    assert len(plots) == 7
    assert all(len(p.title) <= MAX_TITLE_CHARS for p in plots), [p.title for p in plots]
    probes = next(b for b in demo.blocks.values() if isinstance(b, gr.Dataframe) and b.label == "Probe prompts")
    assert probes.column_widths == ["20%", "40%", "40%"] and probes.wrap
