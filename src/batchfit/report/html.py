"""Render a Plan as one self-contained HTML file: inline CSS, inline PNG images, no scripts,
no external resources, every user-supplied string escaped."""

from __future__ import annotations

import base64
import os
import re
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from string import Template

from batchfit.files import write_atomic
from batchfit.plan.plan_file import Plan
from batchfit.plots.memory import memory_png
from batchfit.plots.noise_scale import noise_scale_png
from batchfit.plots.range_test import range_test_png
from batchfit.plots.throughput import throughput_png
from batchfit.units import format_bytes

_TEMPLATE = Template((Path(__file__).with_name("template.html")).read_text(encoding="utf-8"))

_PLAN_ROWS = (
    ("global_batch", "Global batch", "samples per optimizer step"),
    ("micro_batch", "Micro-batch", "samples per forward/backward on one device"),
    ("accumulation_steps", "Accumulation", "micro-batches per optimizer step"),
    ("world_size", "Devices", "data-parallel processes"),
    ("lr", "Learning rate", "at the global batch"),
    ("warmup_steps", "Warmup", "optimizer steps"),
    ("optimizer", "Optimizer", ""),
    ("normalization", "Normalisation", "BatchNorm advice"),
)


# measurement key -> how to draw it from the plan's plain data, and its caption
_FIGURES = (
    (
        "memory",
        lambda plan, data: memory_png(data),
        "Peak memory against batch size: predicted probes, the fitted line, the budget and the "
        "real trials that confirmed the limit.",
    ),
    (
        "throughput",
        lambda plan, data: throughput_png(data),
        "Training throughput against batch size; the knee is the smallest batch within reach of "
        "the best throughput.",
    ),
    (
        "noise_scale",
        lambda plan, data: noise_scale_png(data, global_batch=plan.global_batch),
        "The gradient noise scale (critical batch): below it, doubling the batch nearly halves "
        "the steps; above it, extra samples are mostly wasted.",
    ),
    (
        "range_test",
        lambda plan, data: range_test_png(data, chosen_lr=plan.lr),
        "Learning-rate range test at the chosen global batch, with its suggestions and the "
        "chosen rate.",
    ),
)


def render_report(plan: Plan, *, title: str | None = None) -> str:
    """The report for `plan` as an HTML string (self-contained)."""
    figures = [
        _figure(draw(plan, plan.measurements[key]), caption)
        for key, draw, caption in _FIGURES
        if plan.measurements.get(key)
    ]
    rows = "\n".join(
        f"<tr><th>{escape(label)}</th><td class=value>{escape(_value(plan, name))}</td>"
        f"<td>{_text(plan.reasons.get(name, hint))}</td></tr>"
        for name, label, hint in _PLAN_ROWS
    )
    notes = "".join(f"<li>{_text(note)}</li>" for note in plan.notes)
    budget = (
        format_bytes(plan.memory_budget_bytes)
        if plan.memory_budget_bytes
        else "the device's own memory"
    )
    return _TEMPLATE.substitute(
        title=escape(title or f"batchfit plan: {plan.task}"),
        task=escape(plan.task),
        device=escape(plan.device),
        budget=escape(budget),
        created=escape(datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        rows=rows,
        notes=f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "",
        figures="\n".join(figures),
    )


def write_report(plan: Plan, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Write the report for `plan` to `path`, atomically."""
    return write_atomic(path, render_report(plan, title=title))


def _figure(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img alt="{escape(caption.replace("`", ""))}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_text(caption)}</figcaption></figure>"
    )


_CODE = re.compile(r"`([^`]+)`")


def _text(text: str) -> str:
    """`text` escaped, with `code` in backticks set as <code> rather than shown literally."""
    return _CODE.sub(r"<code>\1</code>", escape(text))


def _value(plan: Plan, name: str) -> str:
    value = getattr(plan, name)
    if name == "lr":
        # choose_lr's reason says when the range test, not the scaling rule, set the rate
        reason = plan.reasons.get("lr", "")
        if "took its suggestion" in reason or "the rate is raised to" in reason:
            return f"{value:.4g} (from the range test)"
        return f"{value:.4g} ({plan.lr_rule} rule)"
    return str(value)
