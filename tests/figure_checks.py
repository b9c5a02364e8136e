"""What a figure fit for a paper must not do, checked on the figure object (shared by the analysis tests)."""

from __future__ import annotations


def legends_overlapping_axes(fig) -> list[str]:
    """Titles of visible axes whose area a legend (of any axes, or of the figure) overlaps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # the figure was saved and closed: draw it again on its own canvas
    canvas.draw()
    renderer = canvas.get_renderer()
    legends = [leg for ax in fig.axes for leg in [ax.get_legend()] if leg] + list(fig.legends)
    out = []
    for leg in legends:
        box = leg.get_window_extent(renderer)
        for ax in fig.axes:
            if ax.get_visible() and box.overlaps(ax.get_window_extent(renderer)):
                out.append(ax.get_title() or "untitled")
    return out
