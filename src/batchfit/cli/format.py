"""How the `batchfit` command prints its results: tables, plain lines and JSON on stdout.

The command's functions in `batchfit.cli.commands` call the library; the longer human-readable
summaries live here, one function per subcommand. Text from the user (task names, paths) is
never read as rich markup: `vit[b/16]` prints as is, and `imagenet[/train]` does not crash.
"""

from __future__ import annotations

import shlex
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from batchfit.files import json_text
from batchfit.units import format_bytes, format_count, format_seconds


class _ResultConsole(Console):
    def on_broken_pipe(self) -> None:
        # rich exits 1 here by itself; `batchfit.cli.main` ends every command the same way on
        # a closed stdout (and tells a `--nproc` launcher), so the error goes there
        raise BrokenPipeError


def stdout_console() -> Console:
    """The console results are printed on; a closed pipe raises BrokenPipeError, as a print
    does, for `batchfit.cli.main` to end the command quietly."""
    return _ResultConsole(file=sys.stdout, soft_wrap=True)


def print_json(result: Any) -> None:
    """A result (its `to_dict()`, or a plain dict) as indented JSON on stdout; NaN and
    infinities print as null (`batchfit.files.json_text`), so strict parsers read it."""
    data = result.to_dict() if hasattr(result, "to_dict") else result
    sys.stdout.write(json_text(data, default=str) + "\n")


def table(title: str, rows: Iterable[Sequence[str]], *, columns: Sequence[str] | None = None):
    """A rich table: `columns` as right-aligned headers, or (label, value) rows without one.
    Titles and cells are plain text, never markup."""
    result = Table(title=Text(title), show_header=columns is not None)
    for column in columns or ():
        result.add_column(Text(column), justify="right", overflow="fold")
    for cells in rows:
        result.add_row(*(Text(str(cell)) for cell in cells))
    return result


def print_estimate(result: dict[str, Any]) -> None:
    """The answer of `batchfit estimate` (a dict of its numbers), one line; at least one sample
    fits (`estimate_does_not_fit` words the other case)."""
    exact, rounded = result["max_batch_size"], result["batch_size"]
    print(f"{exact}{rounding_words(exact, rounded, result['round_to'])}")
    if "card" in result:
        print(
            f"  {result['card']}: {format_bytes(result['capacity_bytes'])}, less "
            f"{format_bytes(result['reserve_bytes'])} reserve (--reserve to change)"
        )


def estimate_does_not_fit(result: dict[str, Any]) -> str:
    """Why `batchfit estimate` found not one sample that fits (its numbers in `result`), and
    what to change."""
    capacity, reserve = result["capacity_bytes"], result["reserve_bytes"]
    if reserve >= capacity:
        return (
            f"Not one sample fits: the reserve ({format_bytes(reserve)}) takes all of the "
            f"{format_bytes(capacity)} of memory. Lower --reserve or give more --memory."
        )
    of = format_bytes(capacity)
    if reserve:
        of += f" ({format_bytes(capacity - reserve)} after the {format_bytes(reserve)} reserve)"
    return (
        f"Not one sample fits: the model takes {format_bytes(result['fixed_bytes'])} of {of}, "
        f"and one sample needs {format_bytes(result['per_sample_bytes'])}. Give more --memory, "
        "or lower --model or --per-sample (lower precision, activation checkpointing, a smaller "
        "model)."
    )


def rounding_phrase(round_to: int | str) -> str:
    """How a batch was rounded, in words: "a power of two" or "a multiple of 8"."""
    return "a power of two" if round_to == "pow2" else f"a multiple of {round_to}"


def rounding_words(exact: int, rounded: int, round_to: int | str | None) -> str:
    """ ", rounded to 96 (a multiple of 32)", or why it was not rounded, or ""."""
    if rounded != exact:
        return f", rounded to {rounded} ({rounding_phrase(round_to)})"
    if isinstance(round_to, int) and 0 < exact < round_to:
        return f" (not rounded: no multiple of {round_to} fits)"
    return ""


def print_memory(console: Console, task_name: str, result: Any) -> None:
    """The trials of a memory search, the memory model and the answer (a SearchResult), with
    its notes (one says whether the answer is above the training set's samples)."""
    say = _plain(console)
    budget = format_bytes(result.budget_bytes)
    if result.trials:
        rows = [
            [
                str(trial.batch_size),
                "-"
                if trial.predicted_peak_bytes is None
                else format_bytes(trial.predicted_peak_bytes),
                "-"
                if trial.measured_peak_bytes is None
                else format_bytes(trial.measured_peak_bytes),
                "yes" if trial.fits else "no (out of memory)",
                str(trial.steps),
                format_seconds(trial.seconds),
            ]
            for trial in result.trials
        ]
        columns = ("batch", "predicted peak", "measured peak", "fits", "steps", "time")
        title = f"Trials: {task_name} on {result.device}, budget {budget}"
    else:
        # No real step ran (a card this machine is not): show what the answer rests on.
        usable = format_bytes(result.usable_bytes)
        rows = [
            [str(size), format_bytes(peak), "yes" if peak <= result.usable_bytes else "no"]
            for size, peak in sorted(set(result.predictions))
        ]
        columns = ("batch", "predicted peak", f"fits {usable}")
        target = result.card or f"a {budget} budget"
        title = f"Predictions: {task_name} for {target} (no real trial)"
    console.print(table(title, rows, columns=columns))
    model = result.memory_model
    if model is not None:
        sizes = model.batch_sizes
        say(f"Memory model: {model.describe()}, fitted over batches {sizes[0]} to {sizes[-1]}")
    if result.state_bytes is not None:
        say(f"Model, gradients and optimizer state: {format_bytes(result.state_bytes)}")
    reserve = f", {format_bytes(result.reserve_bytes)} reserve" if result.reserve_bytes else ""
    target = f"{result.card} ({budget})" if result.card else f"{budget} budget"
    say(
        f"Usable memory: {format_bytes(result.usable_bytes)} ({target}{reserve}, "
        f"{result.margin:.0%} margin)"
    )
    answer = f"Largest batch that fits: {result.limit_batch_size}"
    if result.capped:
        answer += " (or more: the search stopped there)"
    answer += rounding_words(result.limit_batch_size, result.batch_size, result.round_to)
    say(answer, style="bold")
    say(f"Answer {result.basis}: {result.basis_reason}")
    if result.basis == "predicted" and result.attention == "math":
        say(
            "Upper bound: attention took the math path here; a CUDA card's fused kernels need less."
        )
    say(
        f"Found with {result.real_steps} real training steps ({result.oom_errors} out of "
        f"memory) and {len(result.predictions)} predictions ({result.fake_runs} fake-tensor "
        f"runs) in {format_seconds(result.seconds)}."
    )
    for note in result.notes:
        say(f"Note: {note}")


def print_scaled_rate(console: Console, scaled: Any, schedule: Any | None) -> None:
    """A scaled learning rate (ScaledRate), why, its warmup, and the schedule's table if any."""
    from batchfit.lr.schedules import render_schedule

    say = _plain(console)
    say(f"{scaled.lr:.6g}")
    say(f"  {scaled.reason}")
    if scaled.warmup and schedule is not None and not schedule.warmup_steps:
        say(
            f"  warm up: the rate is {scaled.lr / scaled.base_lr:.3g}x the base, but a run of "
            f"{format_count(schedule.total_steps, 'step')} leaves no room for a warmup"
        )
    elif scaled.warmup:
        say(
            f"  warm up: the rate is {scaled.lr / scaled.base_lr:.3g}x the base; ramp up from "
            f"{scaled.base_lr:.6g} (start factor {scaled.warmup_start_factor:.3g})"
        )
    if schedule is not None:
        console.print(render_schedule(schedule, scaled.lr))


def print_train_summary(
    console: Console, name: str, result: Any, noise: dict[str, Any] | None = None
) -> None:
    """What a training run did (a TrainResult): steps, batches, rate, back-offs, files, and the
    noise scale (`noise`: logged, reason, advice, as `batchfit train --json` gives them)."""
    from pathlib import Path

    say = _plain(console)
    stop_reason = getattr(result, "stop_reason", None)
    state = "Interrupted" if result.interrupted else "Stopped" if stop_reason else "Trained"
    budget = getattr(result, "sample_budget", None)
    # Under a sample budget the steps are not known before: samples against the budget.
    length = (
        f"{result.steps}/{result.total_steps} steps, {result.samples_seen:,} samples"
        if budget is None
        else f"{result.steps} steps, {result.samples_seen:,}/{budget:,} samples"
    )
    if result.samples_per_second == 0 and result.steps == result.total_steps:
        say(f"Already complete: {name} at {length}; nothing was left to train")
    else:
        session = getattr(result, "session_samples", result.samples_seen)
        this_session = (
            f" ({session:,} in this session)"
            if result.resumed_from_step and session != result.samples_seen
            else ""
        )
        say(
            f"{state} {name}: {length}{this_session}, {result.seconds:.1f} s "
            f"({result.samples_per_second:,.0f} samples/s in training steps)"
        )
    split = _batch_split(
        result.global_batch, result.micro_batch, result.accumulation_steps, result.world_size
    )
    say(f"  global batch {split}")
    say(f"  lr {result.lr:.6g}: {result.lr_reason}")
    say(f"  schedule: {result.schedule}")
    for event in result.backoffs:
        say(
            f"  out of memory at step {event.step}: micro-batch {event.failed_micro_batch} -> "
            f"{event.micro_batch}"
        )
    for change in getattr(result, "batch_changes", ()):
        # "64 = 2 micro-batches of 16 x 2 ranks", as the line above: "(16 x 2)" read as
        # micro-batch x ranks as well as micro-batch x accumulation.
        split = _batch_split(
            change.new_batch, change.micro_batch, change.accumulation_steps, result.world_size
        )
        say(
            f"  step {change.step}: global batch {change.old_batch} -> {split}, "
            f"rate x{change.lr_factor:.3g}: {change.evidence}"
        )
    if result.val_metrics:
        # An interrupted or stopped run says which step its last evaluation was at.
        val_step = getattr(result, "val_step", None)
        at = f" (at step {val_step})" if val_step is not None and val_step != result.steps else ""
        say(
            "  " + ", ".join(f"{key} {value:.4f}" for key, value in result.val_metrics.items()) + at
        )
    if result.metrics_path:
        say(f"  metrics: {result.metrics_path}")
    if result.checkpoint_path:
        say(f"  checkpoint: {result.checkpoint_path}")
    if stop_reason and not result.interrupted:
        say(f"  stopped at step {result.steps}: {stop_reason}")
    if result.interrupted:
        run_dir = Path(result.checkpoint_path).parent
        say(f"  continue with: batchfit train ... --resume {run_dir}")
    if noise is not None:
        logged = noise["advice"] if noise["logged"] else None
        say(f"  {logged or 'noise scale: not logged (' + noise['reason'] + ')'}")


def _batch_split(global_batch: int, micro_batch: int, steps: int, world_size: int) -> str:
    """ "128 = 8 micro-batches of 16", with " x 2 ranks" under several ranks and the sizes of
    uneven micro-batches."""
    ranks = f" x {world_size} ranks" if world_size > 1 else ""
    pieces = "micro-batch" if steps == 1 else "micro-batches"
    split = f"of {micro_batch}"
    if steps * micro_batch * world_size != global_batch:
        from batchfit.training.accumulation import plan_accumulation

        sizes = plan_accumulation(
            global_batch, micro_batch, world_size, allow_uneven=True
        ).micro_batches
        split = f"({'+'.join(map(str, sizes))}, loss weighted by size)"
    return f"{global_batch} = {steps} {pieces} {split}{ranks}"


_PLAN_ROWS = (  # label, Plan field
    ("global batch", "global_batch"),
    ("micro-batch", "micro_batch"),
    ("accumulation", "accumulation_steps"),
    ("devices", "world_size"),  # only for a plan of several devices
    ("batch schedule", "batch_schedule"),
    ("learning rate", "lr"),
    ("warmup steps", "warmup_steps"),
    ("optimizer", "optimizer"),
    ("normalisation", "normalization"),
)


def print_plan(
    console: Console, plan: Any, *, plan_path: Any, report_path: Any, source: str
) -> None:
    """A Plan as a table (setting, value, why), its notes, the files and the train command
    (`source` is the task as the train command names it: quoted for the shell)."""
    result = Table(title=Text(f"Plan for {plan.task}"), title_justify="left")
    result.add_column("setting")
    result.add_column("value", justify="right")
    result.add_column("why")
    for label, key in _PLAN_ROWS:
        if key == "world_size" and plan.world_size == 1:
            continue
        value = f"{plan.lr:.4g}" if key == "lr" else str(getattr(plan, key))
        result.add_row(label, Text(value), Text(plan.reasons.get(key, "")))
    console.print(result)
    say = _plain(console)
    for note in plan.notes:
        print_note(console, note)
    say(f"plan:   {plan_path}")
    say(f"report: {report_path}")
    # A plan for N devices trains as planned on N processes.
    ranks = f" --nproc {plan.world_size}" if plan.world_size > 1 else ""
    # quoted, so that it runs as printed from a path with spaces
    say(f"train:  batchfit train {source} --plan {shlex.quote(str(plan_path))}{ranks}")


def print_note(console: Console, note: str) -> None:
    """ "note: ..." wrapped at word boundaries within the terminal, under a hanging indent:
    printed as one line, a terminal of 80 columns broke a long note in the middle of words."""
    wrapped = textwrap.fill(
        note,
        width=console.width,
        initial_indent="note: ",
        subsequent_indent=" " * 6,
        break_long_words=False,
        break_on_hyphens=False,
    )
    _plain(console)(wrapped, soft_wrap=True)


def _plain(console: Console) -> Callable[..., None]:
    """console.print for plain sentences: no automatic colouring of numbers and paths."""
    return lambda text, **options: console.print(text, highlight=False, markup=False, **options)
