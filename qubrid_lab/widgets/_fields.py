"""Helpers the widgets share: ranges read from pydantic field metadata, and how a status line looks."""

from __future__ import annotations

import html

from pydantic import BaseModel

COLOURS = {"info": "#444", "ok": "#1a7f37", "error": "#cf222e"}


def bounds(model: type[BaseModel], name: str) -> dict[str, float]:
    """The ``ge`` / ``gt`` / ``le`` / ``lt`` limits declared on ``model.name`` (absent ones left out)."""
    found: dict[str, float] = {}
    for constraint in model.model_fields[name].metadata:
        for key in ("ge", "gt", "le", "lt"):
            value = getattr(constraint, key, None)
            if value is not None:
                found[key] = value
    return found


def range_text(model: type[BaseModel], name: str) -> str:
    """``model.name``'s allowed range in words, e.g. ``"> 0 and ≤ 1"``; empty when it has none."""
    limits = bounds(model, name)
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    return " and ".join(f"{symbols[key]} {limits[key]:g}" for key in ("ge", "gt", "le", "lt") if key in limits)


def slider_range(model: type[BaseModel], name: str) -> tuple[float, float]:
    """The inclusive ends of a bounded field, for a slider."""
    limits = bounds(model, name)
    return limits.get("ge", limits.get("gt")), limits.get("le", limits.get("lt"))


def status_html(text: str, kind: str = "info") -> str:
    """One line of escaped text in the colour of its kind (info, ok or error)."""
    if not text:
        return ""
    return f'<span style="color:{COLOURS[kind]}">{html.escape(text)}</span>'
