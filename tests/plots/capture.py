"""Keep a plot's matplotlib Figure instead of its PNG bytes, so tests assert on axes, labels and
data, not on pixels."""

from __future__ import annotations

from typing import Any


def captured(monkeypatch: Any, module: Any) -> list[Any]:
    """Make `module.png_bytes` keep the figure instead of rendering it; the figures drawn, in
    order."""
    figures: list[Any] = []
    monkeypatch.setattr(module, "png_bytes", lambda figure: figures.append(figure) or b"")
    return figures
