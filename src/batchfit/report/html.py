"""Render a Plan as one self-contained HTML file: inline CSS, inline PNG images, no scripts,
no external resources, every user-supplied string escaped.

With `run_dir`, the report also shows the run that followed the plan: its curves with the
findings of `batchfit.monitor.diagnose.diagnose` shaded (`batchfit.plots.diagnosis`) and each
finding's advice. With `sweep`, it shows a measured critical batch (`batchfit.sweep`): steps
to target against the batch with the fit, and the best rate against the batch
(`batchfit.plots.sweep`).
"""

from __future__ import annotations

import base64
import os
import re
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING

from batchfit.files import write_atomic
from batchfit.plan.plan_file import Plan
from batchfit.plots.memory import memory_png
from batchfit.plots.noise_scale import noise_scale_png
from batchfit.plots.range_test import range_test_png
from batchfit.plots.throughput import throughput_png
from batchfit.units import format_bytes, format_samples

if TYPE_CHECKING:
    from batchfit.sweep.result import SweepResult

__all__ = ["REPORT_NAME", "render_report", "update_plan_report", "write_report"]

REPORT_NAME = "report.html"
"""The report's file name in a plan folder (`batchfit plan --out DIR`)."""

_TEMPLATE = Template((Path(__file__).with_name("template.html")).read_text(encoding="utf-8"))

_PLAN_ROWS = (
    ("global_batch", "Global batch", "samples per optimizer step"),
    ("micro_batch", "Micro-batch", "samples per forward/backward on one device"),
    ("accumulation_steps", "Accumulation", "micro-batches per optimizer step"),
    ("world_size", "Devices", "data-parallel processes"),
    ("batch_schedule", "Batch schedule", "constant, or grown during the run"),
    ("lr", "Learning rate", "at the global batch"),
    ("warmup_steps", "Warmup", "optimizer steps"),
    ("optimizer", "Optimizer", ""),
    ("normalization", "Normalisation", "BatchNorm advice"),
)


# measurement key -> how to draw it from the plan's plain data, and its caption
_FIGURES = (
    (
        "memory",
        lambda plan, data: memory_png(data, micro_batch=plan.micro_batch),
        None,  # said by _memory_caption: what the figure holds
    ),
    (
        "throughput",
        lambda plan, data: throughput_png(data, chosen=_chosen_per_device(plan)),
        "Training throughput against batch size, with the chosen batch; the knee is the smallest "
        "batch within reach of the best throughput.",
    ),
    (
        "noise_scale",
        lambda plan, data: noise_scale_png(
            data, global_batch=plan.global_batch, planned_for=_noise_trend(plan)
        ),
        "The gradient noise scale (critical batch): below it, doubling the batch nearly halves "
        "the steps; above it, extra samples are mostly wasted.",
    ),
    (
        "range_test",
        lambda plan, data: range_test_png(
            data, chosen_lr=plan.lr if data.get("global_batch") == plan.global_batch else None
        ),
        "Learning-rate range test at the chosen global batch, with its suggestions and the "
        "chosen rate.",
    ),
)


def render_report(
    plan: Plan,
    *,
    title: str | None = None,
    run_dir: str | os.PathLike | None = None,
    sweep: SweepResult | None = None,
) -> str:
    """The report for `plan` as an HTML string (self-contained); see `write_report`."""
    figures = [
        _figure(
            draw(plan, plan.measurements[key]),
            _caption(plan, key, caption),
        )
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
        run="" if run_dir is None else _run_section(plan, run_dir),
        sweep="" if sweep is None else _sweep_section(sweep),
    )


def _caption(plan: Plan, key: str, caption: str | None) -> str:
    """A figure's caption; the throughput's says where its timing stopped and what the training
    loop adds to its steps."""
    if caption is None:
        return _memory_caption(plan.measurements[key])
    overhead = plan.measurements.get("loop_overhead") or {}
    tested_at = plan.measurements[key].get("global_batch")
    if key == "range_test" and tested_at not in (None, plan.global_batch):
        # the rate trial found the tested batch too large for the run and halved it
        return (
            f"Learning-rate range test at global batch {tested_at}, with its suggestions. Not "
            f"even the rule's rate trained there in the planned run's first steps, so the plan "
            f"halved the batch to {plan.global_batch} (see the global batch's reason); its rate "
            f"{plan.lr:.4g} is for {plan.global_batch} and is not marked here."
        )
    sweeps = (plan.measurements[key].get("sweeps") or {}) if key == "range_test" else {}
    if len(sweeps.get("each") or []) > 1:
        medians = ", ".join(
            f"{name} {sweeps[field]:.3g}"
            for name, field in (
                ("valley", "valley_lr"),
                ("steepest descent", "steepest_lr"),
                ("lowest loss at", "best_lr"),
            )
            if sweeps.get(field) is not None
        )
        caption += (
            f" Drawn: the first of {len(sweeps['each'])} sweeps, with its own suggestions; the "
            f"plan used their medians ({medians})."
        )
    trend = _noise_trend(plan)
    if key == "noise_scale" and trend is not None:
        caption += (
            f" Drawn: the last measurement, after {plan.measurements[key].get('step')} steps; "
            f"the plan chose its batch for the noise scale its trend reaches at {trend[1]:,} "
            f"samples, {format_samples(trend[0])} (dotted; see the global batch's reason)."
        )
    devices = plan.world_size if key == "throughput" and plan.world_size > 1 else 1
    if devices > 1:
        caption += (
            f" The batch is per device: the global batch is spread over the {devices} devices."
        )
    if key == "throughput" and plan.measurements[key].get("limit_reason") == "noise_scale":
        caption += (
            f" Batches above {plan.measurements[key]['limit_batch']} were not timed: the plan "
            "chooses at most twice the noise scale it plans for, and this is the power of two "
            "at four times it"
            + (f" over the {devices} devices" if devices > 1 else "")
            + " (the batch above its choice is named in the reason)."
        )
    timed = plan.measurements[key].get("batch_sizes") or []
    if key == "throughput" and plan.measurements[key].get("stopped_early") and timed:
        limit = plan.measurements[key].get("limit_batch")
        caption += (
            f" Timing stopped after batch {timed[-1]}: larger batches brought no further gain"
            + (f", so none up to the limit {limit} was timed." if limit else ".")
        )
    if key == "throughput" and overhead.get("loop_seconds"):
        caption += (
            f" The steps timed are bare training steps; batchfit's training loop adds "
            f"{1000 * overhead['seconds_per_step']:.2f} ms to each (measured at batch "
            f"{overhead['batch']}), which the global batch's time model counts."
        )
    return caption


def _chosen_per_device(plan: Plan) -> tuple[int, str]:
    """The plan's batch where the throughput figure's axis counts it (per device), and its
    legend label."""
    if plan.world_size > 1:
        per_device = plan.global_batch // plan.world_size
        return per_device, f"chosen: {per_device} per device (global batch {plan.global_batch})"
    return plan.global_batch, f"chosen global batch {plan.global_batch}"


def _noise_trend(plan: Plan) -> tuple[float, int] | None:
    """(noise scale, samples) the plan extrapolated its measurements to, or None when it chose
    its batch for the measurement the figure draws."""
    trend = (plan.measurements.get("noise_trend") or {}).get("trend")
    if not trend or trend.get("noise_scale_samples") is None:
        return None
    return float(trend["noise_scale_samples"]), int(trend["at_samples"])


def write_report(
    plan: Plan,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    run_dir: str | os.PathLike | None = None,
    sweep: SweepResult | None = None,
) -> Path:
    """Write the report for `plan` to `path`, atomically.

    Args:
        plan: the plan (its measurements are drawn).
        path: the HTML file to write.
        title: the page's heading; default "batchfit plan: TASK".
        run_dir: a run that followed the plan (any log `batchfit.monitor.readers.read_history`
            reads): its curves with the diagnosis's findings shaded, and their advice.
        sweep: a measured critical batch (`batchfit.sweep.driver.run_sweep`'s result): steps
            to target and best rate against the batch.

    Returns:
        The path written.

    Raises:
        RunLogError: `run_dir` holds no run log that can be read.
        MissingDependencyError: matplotlib is not installed.

    Example:
        >>> import tempfile, pathlib
        >>> from batchfit.plan.plan_file import Plan
        >>> plan = Plan(task="digits", device="cpu", world_size=1, global_batch=64,
        ...             micro_batch=64, accumulation_steps=1, lr=0.1, lr_rule="linear",
        ...             warmup_steps=0)
        >>> path = write_report(plan, pathlib.Path(tempfile.mkdtemp()) / "report.html")
        >>> path.read_text().startswith("<!DOCTYPE html>")
        True
    """
    return write_atomic(path, render_report(plan, title=title, run_dir=run_dir, sweep=sweep))


def update_plan_report(plan_path: str | os.PathLike, run_dir: str | os.PathLike) -> Path | None:
    """Rewrite the report next to a plan file with the run that followed it.

    `batchfit plan` writes plan.json and report.html into one folder; after `batchfit train
    --plan DIR/plan.json`, the report in DIR gains the run's curves and findings
    (`write_report(plan, ..., run_dir=run_dir)`). A plan without a report beside it is left so.

    Args:
        plan_path: the plan file the run followed.
        run_dir: the run's folder (its metrics.jsonl).

    Returns:
        The report's path, or None when the plan's folder holds no report.html.

    Raises:
        CheckpointError: the plan cannot be read.
        RunLogError: the run folder holds no run log that can be read.
    """
    from batchfit.plan.plan_file import load_plan

    folder = Path(plan_path) if Path(plan_path).is_dir() else Path(plan_path).parent
    report = folder / REPORT_NAME
    if not report.is_file():
        return None
    return write_report(load_plan(plan_path), report, run_dir=run_dir)


def _run_section(plan: Plan, run_dir: str | os.PathLike) -> str:
    """The run's curves with its findings, and each finding's advice."""
    from batchfit.monitor.diagnose import diagnose
    from batchfit.monitor.readers import read_history
    from batchfit.plots.diagnosis import diagnosis_png

    history = read_history(run_dir)
    diagnosis = diagnose(history, plan=plan)
    if diagnosis.findings:
        items = "".join(
            f"<li><strong>{escape(f.kind)}</strong> ({escape(f.severity)}): "
            f"{escape(f.summary)}<br>{escape(f.advice)}</li>"
            for f in diagnosis.findings
        )
        found = f"<ul class=findings>{items}</ul>"
    else:
        checked = ", ".join(diagnosis.checked) or "nothing"
        found = f"<p>No problem found (checked: {escape(checked)}).</p>"
    notes = "".join(f"<li>{escape(note)}</li>" for note in diagnosis.notes)
    caption = (
        "The run's training and validation curves against the optimizer step, each finding's "
        "steps shaded and labelled by its kind; below them, when the run logged it, the "
        "gradient noise scale against the global batch (samples, log scale)."
    )
    return (
        "<h2>The run</h2>"
        # absolute: the report lives in the plan's folder, not where the run was started
        f"<p class=meta>Read from {escape(str(Path(history.source or run_dir).resolve()))}, "
        f"{escape(history.format)} log.</p>"
        + _figure(diagnosis_png(history.to_dict(), diagnosis.to_dict()), caption)
        + found
        + (f"<ul class=meta>{notes}</ul>" if notes else "")
    )


def _sweep_section(sweep: SweepResult) -> str:
    """The sweep's read-out and its two pictures."""
    from batchfit.plots.sweep import sweep_rates_png, sweep_steps_png

    data = sweep.to_dict()
    rows = "".join(
        f"<li>{escape(label)}: <strong>{escape(value)}</strong></li>"
        for label, value in sweep.summary_rows()
    )
    return (
        "<h2>Critical batch, measured</h2>"
        f"<p>{escape(sweep.describe())}</p><ul>{rows}</ul>"
        + _figure(sweep_steps_png(data), _sweep_steps_caption(sweep))
        + _figure(
            sweep_rates_png(data),
            "The best learning rate at each global batch, with the rule-scaled rate the plan "
            "would use.",
        )
    )


def _sweep_steps_caption(sweep: SweepResult) -> str:
    """The steps figure's caption, naming only what it draws."""
    caption = (
        f"Steps to reach {sweep.target} against the global batch (log axes), seed range as bars"
    )
    if sweep.fit is not None:
        caption += ", with the fit S = S_min + E_min/B"
        if sweep.critical_batch is not None:
            caption += " and the critical batch B_crit = E_min/S_min"
    if (sweep.noise_scale or {}).get("noise_scale_samples"):
        caption += "; the dotted line is the measured noise scale"
    missed = [str(batch) for batch, _ in sweep.missed()]
    if missed:
        caption += (
            f"; batch {', '.join(missed)} never reached the target (an open triangle at its "
            "step cap, left out of the fit)"
        )
    return caption + "."


def _memory_caption(data: dict) -> str:
    """The memory figure's caption, naming only what it draws: a plan on the CPU has no budget
    line (nor a memory limit), and a limit found by prediction alone has no real trials."""
    parts = ["predicted probes", "the fitted line"]
    if data.get("capacity_bytes"):
        parts.append("the budget")
        if data.get("usable_bytes") and data["usable_bytes"] < data["capacity_bytes"]:
            parts.append("the usable memory the limit is found under")
        if data.get("limit_batch"):
            parts.append("the limit")
    if data.get("trials"):
        parts.append("the real trials that confirmed the limit")
    parts.append("the chosen micro-batch")
    listed = ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"Peak memory against batch size: {listed}."


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
        if "back to the rule's" in reason:
            # a raised rate that failed the trial in the planned run's first steps
            return f"{value:.4g} ({plan.lr_rule} rule)"
        trials = plan.measurements.get("rate_trials") or []
        if trials and value > trials[0]["lr"] * (1 + 1e-9):
            # twice the range test's rate trained clearly better in the trial's steps
            return f"{value:.4g} (range test, raised in the rate trial)"
        if "took its suggestion" in reason or "the rate is raised to" in reason:
            return f"{value:.4g} (from the range test)"
        return f"{value:.4g} ({plan.lr_rule} rule)"
    return str(value)
