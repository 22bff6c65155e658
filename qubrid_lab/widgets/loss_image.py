"""The loss curves as a PNG: what a saved notebook keeps of ``TrainingMonitor``'s live plot.

The live plot is a plotly widget; its state lives in the browser, so a notebook saved, opened on GitHub (which
strips JavaScript and widget state), checked by nbval or reopened without its kernel shows no curve. The image
drawn here is an ordinary ``image/png`` cell output, readable everywhere. matplotlib draws it with its Agg
renderer (a wheel, no browser; plotly's own export would need kaleido and a Chromium process per image), through
the object API only, so the notebook's own pyplot backend and figures are left alone. It is imported when the
first image is drawn.
"""

from __future__ import annotations

import io

# how each curve looks, here and in the live plot: key in ``TrainingMonitor.points`` -> (legend name, colour)
CURVES = {"training": ("training loss", "#1f77b4"), "validation": ("validation loss", "#ff7f0e")}


def loss_png(points: dict[str, dict[int, float]], title: str, total_steps: int | None = None) -> bytes | None:
    """The training loss per step and the validation loss per evaluation, as the live plot draws them, in an
    800x360 PNG headed by ``title``; None when there is no point to draw. ``total_steps`` sets the step axis."""
    if not any(points.values()):
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 3.6), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    for key, style in (("training", {"marker": "o"}), ("validation", {"marker": "D", "linestyle": "--"})):
        steps = sorted(points[key])
        if not steps:
            continue
        name, colour = CURVES[key]
        axes.plot(steps, [points[key][step] for step in steps], label=name, color=colour, markersize=4, **style)
    axes.set_title(title, loc="left", fontsize=10)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    last_step = max(max(curve, default=0) for curve in points.values())
    highest = max(max(curve.values(), default=0) for curve in points.values())
    axes.set_xlim(0, max(total_steps or 0, last_step) + 0.5)
    axes.set_ylim(0, highest * 1.1 or 1)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # there are no half steps
    axes.grid(color="#e5e5e5")
    axes.legend(loc="lower right", bbox_to_anchor=(1, 1), ncols=2, frameon=False)  # beside the title
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()
