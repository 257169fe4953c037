"""How the commands print a number in their tables: fixed digits, ``-`` where there is none."""

from __future__ import annotations


def fmt(value: float | None, digits: int = 3) -> str:
    """``value`` to ``digits`` decimals, or ``-`` for None (an AUC undefined on one class)."""
    return "-" if value is None else f"{value:.{digits}f}"
