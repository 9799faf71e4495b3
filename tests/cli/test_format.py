"""Tests of batchfit.cli.format: the command's printed summaries."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
from rich.console import Console

from batchfit.cli.format import print_json, print_plan, rounding_phrase, table


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


def test_user_text_is_never_read_as_markup():
    # A task named like this crashed five subcommands after the work was done.
    console, buffer = _console()
    console.print(table("Throughput: imagenet[/train]", [["vit[b/16]", "[bold]x"]]))
    text = buffer.getvalue()
    assert "imagenet[/train]" in text and "vit[b/16]" in text and "[bold]x" in text


def test_plan_rows_reasons_notes_and_train_command():
    plan = SimpleNamespace(
        task="digits", world_size=1, global_batch=128, micro_batch=64, accumulation_steps=2,
        lr=0.0123456,
        warmup_steps=10, optimizer="task", normalization="none", batch_schedule="constant",
        reasons={"lr": "scaled by the sqrt rule"}, notes=["a note"],
    )  # fmt: skip
    console, buffer = _console()
    print_plan(console, plan, plan_path="p/plan.json", report_path="p/report.html", source="x:y")
    text = buffer.getvalue()
    assert "0.01235" in text and "scaled by the sqrt rule" in text
    assert "note: a note" in text
    assert "train:  batchfit train x:y --plan p/plan.json\n" in text


def test_the_train_command_of_a_plan_for_two_devices_starts_two_processes():
    plan = SimpleNamespace(
        task="digits", world_size=2, global_batch=128, micro_batch=64, accumulation_steps=1,
        lr=0.01, warmup_steps=0, optimizer="task", normalization="none",
        batch_schedule="constant", reasons={}, notes=[],
    )  # fmt: skip
    console, buffer = _console()
    print_plan(console, plan, plan_path="p/plan.json", report_path="p/report.html", source="x:y")
    assert "train:  batchfit train x:y --plan p/plan.json --nproc 2\n" in buffer.getvalue()


def test_a_plan_for_two_devices_shows_its_devices_row_and_one_device_does_not():
    reasons = {"world_size": "planned for 2 data-parallel devices"}
    rows = {}
    for world_size in (1, 2):
        plan = SimpleNamespace(
            task="digits", world_size=world_size, global_batch=128, micro_batch=64,
            accumulation_steps=2 // world_size, lr=0.01, warmup_steps=0, optimizer="task",
            normalization="none", batch_schedule="constant", reasons=reasons, notes=[],
        )  # fmt: skip
        console, buffer = _console()
        print_plan(console, plan, plan_path="p", report_path="r", source="x:y")
        rows[world_size] = [line for line in buffer.getvalue().splitlines() if "devices" in line]
    assert rows[1] == []
    assert len(rows[2]) == 1 and "2" in rows[2][0] and "planned for 2" in rows[2][0]


def test_plan_with_markup_in_the_task_name_prints_it_as_is():
    plan = SimpleNamespace(
        task="vit[b/16]", world_size=1, global_batch=8, micro_batch=8, accumulation_steps=1, lr=0.1,
        warmup_steps=0, optimizer="task", normalization="none", batch_schedule="constant",
        reasons={}, notes=["[/x]"],
    )  # fmt: skip
    console, buffer = _console()
    print_plan(console, plan, plan_path="p", report_path="r", source="tasks/[a].py:t")
    text = buffer.getvalue()
    assert "Plan for vit[b/16]" in text and "note: [/x]" in text and "tasks/[a].py:t" in text


@pytest.mark.parametrize("width", [80, 120])
def test_plan_notes_wrap_at_words_within_the_terminal(width):
    note = (
        "Quick plan: the noise scale is one measurement over 12 big batches after 50 warm-up "
        "steps (a full plan measures at 50 and 200 steps over 30 batches each and extrapolates "
        "its growth to the middle of the run), so the batch may be low for the later run."
    )
    plan = SimpleNamespace(
        task="digits", world_size=1, global_batch=128, micro_batch=64, accumulation_steps=2,
        lr=0.01,
        warmup_steps=10, optimizer="task", normalization="none", batch_schedule="constant",
        reasons={}, notes=[note],
    )  # fmt: skip
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, soft_wrap=True)
    print_plan(console, plan, plan_path="p/plan.json", report_path="p/report.html", source="x:y")
    lines = buffer.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("note: Quick plan:"))
    block = lines[start : next(i for i, line in enumerate(lines) if line.startswith("plan:"))]
    assert len(block) > 1 and all(len(line) <= width for line in block)
    assert all(line.startswith("      ") for line in block[1:])  # a hanging indent
    assert all(line == line.rstrip() for line in block)  # no padding to the terminal's width
    assert " ".join(line[6:].strip() for line in block) == note  # no word cut in two


def test_diagnosis_notes_wrap_like_the_plans():
    from batchfit.cli.format_diagnosis import print_diagnosis
    from batchfit.monitor.findings import Diagnosis

    note = (
        "the noise scale (about 561 samples) is 2.2x the global batch, but the run overfits, "
        "and the training set leaves no room for a larger batch (359 at most)"
    )
    history = SimpleNamespace(train_loss=[1.0, 0.5], val_loss=None, source="m.jsonl", format="x")
    buffer = io.StringIO()
    console = Console(file=buffer, width=80, soft_wrap=True)
    print_diagnosis(console, history, Diagnosis(findings=(), checked=("diverging",), notes=(note,)))
    lines = buffer.getvalue().splitlines()
    block = lines[next(i for i, line in enumerate(lines) if line.startswith("note: ")) :]
    assert len(block) == 3 and all(len(line) <= 80 for line in block)
    assert " ".join(line[6:] for line in block) == note


def test_diagnosis_table_folds_a_long_setting_instead_of_cutting_it():
    # In an 80-column terminal the Lightning flag was cropped to "(Trainer(gradient_clip_val=1…"
    from batchfit.cli.format_diagnosis import diagnosis_table
    from batchfit.monitor.findings import Diagnosis, Finding

    advice = (
        "lower the peak learning rate 10x, warm up 2 steps, clip the gradient norm at 1 "
        "(Trainer(gradient_clip_val=1)); confirm the rate with `batchfit lr-range`"
    )
    seen = "the training loss is not finite (NaN or infinite) from step 31, 10 times"
    finding = Finding("diverging", "critical", seen, {}, advice, (31, 40))
    buffer = io.StringIO()
    diagnosis = Diagnosis(findings=(finding,), checked=("diverging",))
    Console(file=buffer, width=80).print(diagnosis_table(diagnosis))
    cells = "".join(
        line.split("│")[3].strip() for line in buffer.getvalue().splitlines() if "│" in line
    )
    assert "…" not in buffer.getvalue()
    assert "(Trainer(gradient_clip_val=1));" in cells


def test_a_batch_change_under_two_ranks_names_ranks_and_micro_batches():
    # The line read "global batch 32 -> 64 (16 x 2)": micro-batch x ranks, or x accumulation?
    from batchfit.cli.format import print_train_summary
    from batchfit.training.batch_schedule import BatchChange

    change = BatchChange(
        step=9, samples_seen=256, old_batch=32, new_batch=64, micro_batch=16,
        accumulation_steps=2, lr_factor=1.41421, evidence="noise scale 90 > 2 x 32",
    )  # fmt: skip
    result = SimpleNamespace(
        interrupted=False, steps=20, total_steps=20, samples_seen=1024, samples_per_second=100.0,
        seconds=1.0, resumed_from_step=None, world_size=2, accumulation_steps=2, micro_batch=16,
        global_batch=64, lr=0.1, lr_reason="given", schedule="constant", backoffs=(),
        batch_changes=(change,), val_metrics={}, metrics_path=None, checkpoint_path=None,
    )  # fmt: skip
    console, out = _console()
    print_train_summary(console, "digits", result)
    line = next(line for line in out.getvalue().splitlines() if "step 9" in line)
    assert line == (
        "  step 9: global batch 32 -> 64 = 2 micro-batches of 16 x 2 ranks, rate x1.41: "
        "noise scale 90 > 2 x 32"
    )


def _strict(text):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_print_json_writes_nan_and_infinity_as_null(capsys):
    # A sweep trial whose target metric came out NaN (a diverged model's val_loss) printed
    # `"metric": NaN` with --json, which jq and JavaScript refuse.
    from batchfit.sweep.trial import TrialResult

    trial = TrialResult(
        batch=16, lr=0.1, seed=0, cap_steps=10, micro_batch=16, steps=None, steps_run=10,
        samples=160, metric=float("nan"), diverged=False, evaluations=2, seconds=0.5,
    )  # fmt: skip
    print_json({"trials": [trial.to_dict()], "spread": (1.0, float("inf"))})
    data = _strict(capsys.readouterr().out)
    assert data["trials"][0]["metric"] is None and data["spread"] == [1.0, None]
