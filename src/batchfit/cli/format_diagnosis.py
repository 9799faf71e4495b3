"""How `batchfit diagnose` (and `batchfit train`'s summary) shows a diagnosis."""

from __future__ import annotations

from typing import TYPE_CHECKING

from batchfit.cli.format import print_note
from batchfit.units import format_count

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from batchfit.monitor.findings import Diagnosis
    from batchfit.monitor.history import History

__all__ = ["diagnosis_table", "print_diagnosis"]


def diagnosis_table(diagnosis: Diagnosis, *, title: str = "Diagnosis") -> Table:
    """A rich table: one row per finding (kind, severity, steps, what was seen, what to do)."""
    from rich.table import Table

    table = Table(title=title, show_lines=True)
    table.add_column("finding", no_wrap=True)
    # fold, not crop: a long setting such as "(Trainer(gradient_clip_val=1);" is the advice
    table.add_column("seen", ratio=1, overflow="fold")
    table.add_column("change", ratio=1, overflow="fold")
    for finding in diagnosis.findings:
        first, last = finding.steps
        steps = f"step {first}" if first == last else f"steps {first}-{last}"
        table.add_row(
            f"{finding.kind}\n{finding.severity}\n{steps}", finding.summary, finding.advice
        )
    return table


def print_diagnosis(console: Console, history: History, diagnosis: Diagnosis) -> None:
    """The table (or "no problem found"), then the notes on what could not be checked."""
    points = len(history.train_loss)
    evaluations = len(history.val_loss) if history.val_loss is not None else 0
    title = (
        f"Diagnosis: {history.source or 'run'} ({history.format}, "
        f"{format_count(points, 'logged step')}, {format_count(evaluations, 'evaluation')})"
    )
    if diagnosis.findings:
        console.print(diagnosis_table(diagnosis, title=title))
    else:
        console.print(title, highlight=False)
        console.print(
            f"No problem found (checked: {', '.join(diagnosis.checked)})."
            if diagnosis.checked
            else "Nothing could be checked yet (see the notes).",
            highlight=False,
        )
    for note in diagnosis.notes:
        print_note(console, note)
