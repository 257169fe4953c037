"""Plotly figures in Shiny without a network: a small output binding over the locally installed plotly.js.

Why not shinywidgets here: with plotly >= 6 a ``FigureWidget`` is an anywidget whose model state
carries the whole plotly.js bundle (about 5 MB) for every plot, and the widget loader falls back to
cdn.jsdelivr.net when its local module load races. Measured on this project's machine, the first two
plots of a panel took 31 s and 21 MB of websocket traffic. Here the figure travels as plotly JSON
(kilobytes), ``Plotly.react`` draws or updates it in place, and plotly.min.js is served once, from the
installed ``plotly`` package, by this app.
"""

from __future__ import annotations

from pathlib import Path

import plotly
import plotly.graph_objects as go
import plotly.io as pio
from htmltools import HTMLDependency, Tag, TagList
from shiny import ui
from shiny.render.renderer import Jsonifiable, Renderer

_STATIC = Path(__file__).resolve().parent / "static"
_PLOTLY_DATA = Path(plotly.__file__).resolve().parent / "package_data"

# The browser-side toolbar: no plotly logo, no link to chart-studio, PNG export kept.
PLOT_CONFIG: dict = {
    "displaylogo": False,
    "responsive": True,
    "showLink": False,
    "modeBarButtonsToRemove": ["sendDataToCloud", "lasso2d", "select2d"],
}


def plotly_dependencies() -> TagList:
    """plotly.min.js from the installed plotly package and the output binding, as HTML dependencies."""
    return TagList(
        HTMLDependency(
            "plotly-js",
            plotly.__version__,
            source={"subdir": str(_PLOTLY_DATA)},
            script={"src": "plotly.min.js"},
        ),
        HTMLDependency(
            "hemorrhage-plotly-binding",
            "1.0",
            source={"subdir": str(_STATIC)},
            script={"src": "plotly-binding.js"},
        ),
    )


def figure_output(id: str, *, height: str | None = None) -> Tag:
    """The placeholder a ``@render_figure`` output draws into (module-namespaced like any output)."""
    from shiny.module import resolve_id

    style = f"min-height: {height};" if height else None
    return ui.div(plotly_dependencies(), id=resolve_id(id), class_="hemorrhage-plotly", style=style)


class render_figure(Renderer[go.Figure]):
    """Render a function returning a ``plotly.graph_objects.Figure`` into a ``figure_output``."""

    def auto_output_ui(self) -> Tag:
        return figure_output(self.output_id)

    async def transform(self, value: go.Figure) -> Jsonifiable:
        # plotly's own JSON encoder handles numpy arrays and escapes '<' so text cannot open tags.
        return {"figure": pio.to_json(value, validate=False), "config": PLOT_CONFIG}
