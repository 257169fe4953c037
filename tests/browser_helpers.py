"""What the browser tests share: waiting for Shiny to settle, opening a panel, reading a plotly
figure's data. Their fixtures (``outside_requests``, ``shot_dir``) are in conftest.py."""

from __future__ import annotations

from playwright.sync_api import Page
from shiny.playwright import controller


def settle(page: Page) -> None:
    """Wait until Shiny has no pending work and no visible output is recalculating (outputs of hidden
    tabs stay marked until their tab is shown)."""
    page.wait_for_function(
        "() => !document.documentElement.classList.contains('shiny-busy') && "
        "![...document.querySelectorAll('.recalculating')].some(e => e.offsetParent !== null)",
        timeout=60_000,
    )
    page.wait_for_timeout(300)  # let plotly finish drawing what just arrived


def open_panel(page: Page, panel: str) -> None:
    controller.PageNavbar(page, "panel").set(panel)
    settle(page)


def figure_data(page: Page, output_id: str, expression: str):
    """Evaluate ``expression`` on the plotly data of a figure output (``data`` is its trace list)."""
    return page.evaluate(
        f"() => {{ const data = document.getElementById('{output_id}').data || []; return {expression}; }}"
    )
