"""Tests of batchfit.cli.format: the command's printed summaries."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from rich.console import Console

from batchfit.cli.format import print_noise_summary, print_plan, rounding_phrase, table


def _console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=200, soft_wrap=True), buffer


def test_rounding_phrase():
    assert rounding_phrase("pow2") == "a power of two"
    assert rounding_phrase(8) == "a multiple of 8"


def test_table_with_and_without_headers():
    console, buffer = _console()
    console.print(table("T", [["a", "1"]], columns=("name", "value")))
    console.print(table("U", [["label", "value"]]))
    text = buffer.getvalue()
    assert "name" in text and "a" in text
    assert "label" in text and text.count("name") == 1


@pytest.mark.parametrize(
    "estimate, words",
    [
        (None, "not yet reliable"),
        (600.0, "well above the global batch"),
        (10.0, "well below the global batch"),
        (70.0, "close to the global batch"),
    ],
)
def test_noise_summary_compares_with_the_global_batch(estimate, words):
    console, buffer = _console()
    noise = SimpleNamespace(tracker=SimpleNamespace(noise_scale=estimate))
    print_noise_summary(console, noise, 64)
    assert words in buffer.getvalue()


def test_noise_summary_when_not_logged():
    console, buffer = _console()
    print_noise_summary(console, None, 64)
    assert "not logged" in buffer.getvalue()


def test_plan_rows_reasons_notes_and_train_command():
    plan = SimpleNamespace(
        task="digits", global_batch=128, micro_batch=64, accumulation_steps=2, lr=0.0123456,
        warmup_steps=10, optimizer="task", normalization="none",
        reasons={"lr": "scaled by the sqrt rule"}, notes=["a note"],
    )  # fmt: skip
    console, buffer = _console()
    print_plan(console, plan, plan_path="p/plan.json", report_path="p/report.html", source="x:y")
    text = buffer.getvalue()
    assert "0.01235" in text and "scaled by the sqrt rule" in text
    assert "note: a note" in text
    assert "train:  batchfit train x:y --plan p/plan.json" in text
