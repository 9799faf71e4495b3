import base64
import json
import math
import os
import re
import shutil

import pytest

from batchfit.cli.main import main
from batchfit.errors import RunLogError
from batchfit.plan.plan_file import Plan
from batchfit.report.html import render_report, update_plan_report, write_report

MIB = 1024**2


def make_plan(task: str = "digits") -> Plan:
    measurements = {
        "memory": {
            "capacity_bytes": 300 * MIB,
            "fixed_bytes": 20 * MIB,
            "per_sample_bytes": 2 * MIB,
            "limit_batch": 140,
            "probes": [[b, 20 * MIB + 2 * MIB * b] for b in (1, 8, 32, 128)],
            "trials": [
                {"batch_size": 140, "measured_bytes": 300 * MIB, "fits": True},
                {"batch_size": 141, "measured_bytes": 302 * MIB, "fits": False},
            ],
        },
        "throughput": {
            "batch_sizes": [8, 16, 32, 64, 128],
            "samples_per_second": [800, 1500, 2600, 3000, 3100],
            "knee_batch": 64,
        },
        "noise_scale": {  # as NoiseScaleResult.to_dict() gives it
            "noise_scale_samples": 180.0,
            "low_samples": 150.0,
            "high_samples": 220.0,
            "running": [{"batches": i, "noise_scale_samples": 150 + i} for i in range(1, 30)],
        },
        "range_test": {
            "lrs": [1e-5 * 1.2**i for i in range(60)],
            "losses": [2.3 - 0.02 * i for i in range(60)],
            "smoothed_losses": [2.3 - 0.02 * i for i in range(60)],
            "steepest_lr": 1e-3,
            "valley_lr": 3e-3,
        },
    }
    return Plan(
        task=task,
        device="cpu",
        world_size=1,
        global_batch=128,
        micro_batch=64,
        accumulation_steps=2,
        lr=2e-3,
        lr_rule="sqrt",
        warmup_steps=10,
        memory_budget_bytes=300 * MIB,
        reasons={"micro_batch": "the largest multiple of 8 under the 140 that fit"},
        notes=["image classification usually trains at 256-512 <samples>"],
        measurements=measurements,
    )


def test_report_is_self_contained_and_escaped():
    html = render_report(make_plan(task="<script>alert('x')</script>"))
    assert "<script" not in html
    assert "&lt;script&gt;" in html
    assert "&lt;samples&gt;" in html
    assert not re.search(r"(src|href)=\"(?!data:)", html)  # nothing fetched from outside
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 4
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for data in images)
    assert "the largest multiple of 8 under the 140 that fit" in html


def test_report_without_measurements_has_no_figures():
    plan = make_plan()
    bare = Plan(**{**plan.to_dict(), "measurements": {}})
    assert "<img" not in render_report(bare)


def test_write_report_is_atomic(tmp_path):
    path = write_report(make_plan(), tmp_path / "report.html")
    assert path.read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def _browser_or_skip():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if chromium and sync_playwright:
        return chromium, sync_playwright
    reason = "the browser test needs Debian's chromium and the playwright package"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; .ci/run installs both")
    pytest.skip(reason)


def open_in_chromium(path, screenshot=None) -> dict:
    """Open an HTML file in headless Chromium: console problems, images, heading, plan rows."""
    chromium, sync_playwright = _browser_or_skip()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            problems = []
            page.on("console", lambda m: m.type in ("error", "warning") and problems.append(m.text))
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("requestfailed", lambda request: problems.append(request.url))
            page.goto(path.as_uri())
            seen = {
                "problems": problems,
                "images": page.evaluate(
                    "Array.from(document.images).map(i => [i.complete, i.naturalWidth])"
                ),
                "heading": page.inner_text("h1"),
                "rows": page.locator("tbody tr").count(),
            }
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return seen


@pytest.mark.integration
def test_report_renders_in_headless_chromium(tmp_path):
    path = write_report(make_plan(task="digits <&>"), tmp_path / "report.html")
    seen = open_in_chromium(path, screenshot=tmp_path / "report.png")
    assert seen["problems"] == []
    assert len(seen["images"]) == 4
    assert all(done and width > 0 for done, width in seen["images"])
    assert seen["heading"] == "batchfit plan: digits <&>"
    assert seen["rows"] == 9  # one row per plan setting


@pytest.mark.integration
def test_report_with_a_run_and_a_sweep_renders_in_headless_chromium(tmp_path):
    run = write_diverging_run(tmp_path / "run")
    path = write_report(make_plan(), tmp_path / "report.html", run_dir=run, sweep=make_sweep())
    seen = open_in_chromium(path, screenshot=tmp_path / "report.png")
    assert seen["problems"] == []
    assert len(seen["images"]) == 7  # 4 measurements, the run's curves, steps and rates
    assert all(done and width > 0 for done, width in seen["images"])
    assert seen["rows"] == 9  # the findings and the read-out are lists, not plan rows


def test_a_rate_set_by_the_range_test_is_not_labelled_with_the_scaling_rule():
    plan = make_plan()
    scaled = render_report(plan)
    assert f"({plan.lr_rule} rule)" in scaled
    reason = "linear rule; the range test still trains well above it, so the rate is raised to x"
    raised = Plan(**{**plan.to_dict(), "reasons": {**plan.reasons, "lr": reason}})
    html = render_report(raised)
    assert "(from the range test)" in html and f"({plan.lr_rule} rule)" not in html


def test_a_rate_doubled_in_the_trial_says_so():
    plan = make_plan()
    reason = "the rate is raised to its valley 0.0045; tried ... and at twice the rate ..."
    trials = [{"lr": 0.0045, "diverged": False}, {"lr": 0.009, "diverged": False}]
    doubled = Plan(
        **{
            **plan.to_dict(),
            "lr": 0.009,
            "reasons": {**plan.reasons, "lr": reason},
            "measurements": {**plan.measurements, "rate_trials": trials},
        }
    )
    html = render_report(doubled)
    assert "0.009 (range test, raised in the rate trial)" in html
    assert "(from the range test)" not in html
    kept = Plan(**{**doubled.to_dict(), "lr": 0.0045})  # twice the rate was tried, not kept
    assert "0.0045 (from the range test)" in render_report(kept)


def test_backticks_become_code_not_literal_text():
    plan = make_plan()
    noted = Plan(
        **{
            **plan.to_dict(),
            "notes": ["`batchfit train` logs it, <b> stays escaped"],
            "reasons": {**plan.reasons, "lr": "see `batchfit.lr.scaling`"},
        }
    )
    html = render_report(noted)
    assert "<code>batchfit train</code> logs it, &lt;b&gt; stays escaped" in html
    assert "see <code>batchfit.lr.scaling</code>" in html
    assert "`" not in html


# --- a run that followed the plan, and a measured critical batch -------------------------------


def write_diverging_run(folder):
    """A batchfit metrics.jsonl whose loss falls, then turns non-finite at step 41."""
    folder.mkdir(parents=True, exist_ok=True)
    losses = [2.3 * 0.9**step for step in range(40)] + [math.nan]
    lines = [
        {"step": step + 1, "samples_seen": 128 * (step + 1), "loss": loss}
        for step, loss in enumerate(losses)
    ]
    text = "\n".join(json.dumps(line) for line in lines)
    (folder / "metrics.jsonl").write_text(text + "\n")
    return folder


def make_sweep():
    from batchfit.sweep.fit import fit_steps
    from batchfit.sweep.result import BatchPoint, SweepResult

    batches = [8, 16, 32, 64]
    steps = [400 + 8000 / batch for batch in batches]  # S_min 400, E_min 8000: B_crit 20
    points = tuple(
        BatchPoint(
            batch=batch,
            steps=value,
            steps_low=int(value) - 5,
            steps_high=int(value) + 5,
            best_lr=0.01 * batch / 8,
            scaled_lr=0.01 * batch / 8,
            rates=(0.005 * batch / 8, 0.01 * batch / 8, 0.02 * batch / 8),
            trials=3,
        )
        for batch, value in zip(batches, steps)
    )
    return SweepResult(
        task="digits",
        target="val_accuracy>=0.9",
        seeds=(0,),
        points=points,
        fit=fit_steps(batches, steps),
        fit_reason="",
        critical_batch_low=18.0,
        critical_batch_high=22.0,
        lr_exponent=1.0,
        lr_rule="linear",
        noise_scale=None,
        trials=(),
        trials_run=12,
        trials_resumed=0,
        samples=10_000,
        seconds=1.0,
        folder=None,
    )


def test_a_run_adds_its_curves_and_findings_with_their_advice(tmp_path):
    run = write_diverging_run(tmp_path / "run")
    html = render_report(make_plan(), run_dir=run)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 5
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for data in images)
    assert "<h2>The run</h2>" in html and "<strong>diverging</strong>" in html
    assert "lower" in html.split("<h2>The run</h2>")[1]  # the advice: a lower rate
    assert "The run" not in render_report(make_plan())


def test_a_sweep_adds_its_steps_and_rates_pictures(tmp_path):
    html = render_report(make_plan(), sweep=make_sweep())
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 6
    section = html.split("<h2>Critical batch, measured</h2>")[1]
    assert "B_crit = E_min/S_min: <strong>20</strong>" in section
    assert "Steps to reach val_accuracy&gt;=0.9" in section


def test_a_missing_run_names_the_fix(tmp_path):
    with pytest.raises(RunLogError):
        render_report(make_plan(), run_dir=tmp_path / "nothing")


def test_the_plan_folders_report_is_rewritten_only_when_it_has_one(tmp_path):
    run = write_diverging_run(tmp_path / "run")
    folder = tmp_path / "plan"
    folder.mkdir()
    make_plan().save(folder / "plan.json")
    assert update_plan_report(folder / "plan.json", run) is None
    assert sorted(p.name for p in folder.iterdir()) == ["plan.json"]
    write_report(make_plan(), folder / "report.html")
    assert update_plan_report(folder / "plan.json", run) == folder / "report.html"
    assert "<h2>The run</h2>" in (folder / "report.html").read_text()


def test_train_with_a_plan_rewrites_the_plan_folders_report(tmp_path, capsys):
    folder = tmp_path / "plan"
    folder.mkdir()
    plan = make_plan()
    plan.save(folder / "plan.json")
    write_report(plan, folder / "report.html")
    argv = ["train", "--example", "digits", "--plan", str(folder / "plan.json"), "--steps", "3"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["report_path"] == str(folder / "report.html")
    html = (folder / "report.html").read_text()
    assert "<h2>The run</h2>" in html
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 5


def test_a_raised_rate_that_failed_its_trial_is_labelled_with_the_rule():
    plan = make_plan()
    reason = (
        "0.001 at batch 32 x sqrt(128/32) = 0.002; the range test at this batch still trains "
        "well above it, so the rate is raised to its valley 0.016; tried in the planned run's "
        "first steps: 0.016 for 42 steps: loss 2.3 -> 14 (diverged); back to the rule's 0.002: "
        "the rate is 0.002"
    )
    fell_back = Plan(**{**plan.to_dict(), "reasons": {**plan.reasons, "lr": reason}})
    html = render_report(fell_back)
    assert "0.002 (sqrt rule)" in html and "(from the range test)" not in html


def test_the_memory_caption_names_only_what_the_figure_draws():
    plan = make_plan()
    full = render_report(plan)
    assert "the budget, the limit, the real trials that confirmed the limit and the chosen" in full
    cpu = {**plan.measurements["memory"], "capacity_bytes": None, "trials": []}
    html = render_report(Plan(**{**plan.to_dict(), "memory_budget_bytes": None,
                                 "measurements": {"memory": cpu}}))  # fmt: skip
    (caption,) = re.findall(r"<figcaption>([^<]*)</figcaption>", html)
    assert caption == (
        "Peak memory against batch size: predicted probes, the fitted line and the chosen "
        "micro-batch."
    )
    usable = {**plan.measurements["memory"], "usable_bytes": 285 * MIB, "margin": 0.05}
    html = render_report(Plan(**{**plan.to_dict(), "measurements": {"memory": usable}}))
    assert "the budget, the usable memory the limit is found under, the limit, the real" in html


def test_the_throughput_caption_says_what_the_loop_adds_when_it_was_measured():
    plan = make_plan()
    assert "training loop adds" not in render_report(plan)
    overhead = {"batch": 32, "bare_seconds": 0.0011, "loop_seconds": 0.0024,
                "seconds_per_step": 0.0013, "steps": 60, "skipped": None}  # fmt: skip
    measured = Plan(**{**plan.to_dict(), "measurements": {
        **plan.measurements, "loop_overhead": overhead}})  # fmt: skip
    assert "training loop adds 1.30 ms to each (measured at batch 32)" in render_report(measured)
    skipped = {**overhead, "loop_seconds": None, "seconds_per_step": 0.0, "skipped": "slow"}
    not_measured = Plan(**{**plan.to_dict(), "measurements": {
        **plan.measurements, "loop_overhead": skipped}})  # fmt: skip
    assert "training loop adds" not in render_report(not_measured)


def test_the_throughput_caption_says_where_the_noise_scale_stopped_the_timing():
    plan = make_plan()
    assert "were not timed" not in render_report(plan)
    bounded = {**plan.measurements["throughput"], "limit_batch": 256, "limit_reason": "noise_scale"}
    html = render_report(Plan(**{**plan.to_dict(), "measurements": {
        **plan.measurements, "throughput": bounded}}))  # fmt: skip
    assert "Batches above 256 were not timed" in html and "four times" in html


def test_the_sweep_caption_names_the_noise_scale_and_the_batches_that_missed():
    from dataclasses import replace

    from batchfit.sweep.result import BatchPoint
    from batchfit.sweep.trial import TrialResult

    sweep = make_sweep()
    plain = render_report(make_plan(), sweep=sweep).split("<h2>Critical batch, measured</h2>")[1]
    assert "noise scale" not in plain and "never reached" not in plain
    missed = BatchPoint(128, None, None, None, None, 0.16, (0.08, 0.16, 0.32), 3)
    trial = TrialResult(128, 0.16, 0, 30, 128, None, 30, 3840, 0.5, False, 4, 0.1)
    both = replace(
        sweep,
        points=(*sweep.points, missed),
        trials=(trial,),
        noise_scale={"noise_scale_samples": 25.0},
    )
    section = render_report(make_plan(), sweep=both).split("<h2>Critical batch, measured</h2>")[1]
    assert "the dotted line is the measured noise scale" in section
    assert "batch 128 never reached the target (an open triangle at its step cap" in section


def test_a_range_test_at_a_batch_the_plan_then_halved_is_captioned_with_its_own_batch(
    monkeypatch,
):
    import batchfit.report.html as html_module

    marked = []
    real = html_module.range_test_png
    monkeypatch.setattr(
        html_module,
        "range_test_png",
        lambda data, chosen_lr=None: marked.append(chosen_lr) or real(data, chosen_lr=chosen_lr),
    )
    plan = make_plan()
    tested = {**plan.measurements["range_test"], "global_batch": plan.global_batch}
    same = Plan(**{**plan.to_dict(), "measurements": {**plan.measurements, "range_test": tested}})
    assert "Learning-rate range test at the chosen global batch" in render_report(same)
    assert marked == [plan.lr]

    halved = Plan(**{**same.to_dict(), "global_batch": 64, "micro_batch": 32, "lr": 1e-3})
    html = render_report(halved)
    assert "Learning-rate range test at global batch 128, with its suggestions" in html
    assert "halved the batch to 64" in html and "at the chosen global batch" not in html
    assert marked[-1] is None  # a rate for 64 is not drawn on a test at 128


def test_the_noise_figure_shows_the_noise_scale_the_plan_extrapolated_to(monkeypatch):
    import batchfit.report.html as html_module

    drawn = []
    real = html_module.noise_scale_png
    monkeypatch.setattr(
        html_module,
        "noise_scale_png",
        lambda data, **options: drawn.append(options) or real(data, **options),
    )
    plan = make_plan()
    measured = {**plan.measurements["noise_scale"], "step": 200}
    trend = {"points": [], "trend": {"noise_scale_samples": 365.2, "at_samples": 7190}}
    extrapolated = Plan(**{**plan.to_dict(), "measurements": {
        **plan.measurements, "noise_scale": measured, "noise_trend": trend}})  # fmt: skip
    html = render_report(extrapolated)
    # the figure drew 180 (step 200) while the table's reason chose the batch for 365
    assert "after 200 steps" in html and "at 7,190 samples, 365 (dotted" in html
    assert drawn[-1]["planned_for"] == (365.2, 7190)
    render_report(plan)
    assert drawn[-1]["planned_for"] is None


def test_the_throughput_caption_says_why_timing_stopped_below_the_limit():
    plan = make_plan()
    assert "Timing stopped" not in render_report(plan)
    stopped = {**plan.measurements["throughput"], "limit_batch": 2048, "limit_reason": "dataset",
               "stopped_early": True}  # fmt: skip
    html = render_report(Plan(**{**plan.to_dict(), "measurements": {
        **plan.measurements, "throughput": stopped}}))  # fmt: skip
    assert (
        "Timing stopped after batch 128: larger batches brought no further gain, so none up "
        "to the limit 2048 was timed." in html
    )


def test_the_run_is_named_by_a_path_that_holds_wherever_the_report_is_read(tmp_path, monkeypatch):
    write_diverging_run(tmp_path / "work" / "runs" / "run")
    monkeypatch.chdir(tmp_path / "work")  # `batchfit train` ran here, its --out relative
    html = render_report(make_plan(), run_dir="runs/run")
    # the report sits in the plan's folder: a path relative to the run's cwd named nothing there
    log = (tmp_path / "work" / "runs" / "run" / "metrics.jsonl").resolve()
    assert f"Read from {log}, " in html


def test_the_range_test_caption_says_the_plan_used_the_medians_of_its_sweeps():
    plan = make_plan()
    assert "sweeps" not in render_report(plan)
    each = [{"valley_lr": 0.00453, "steepest_lr": s, "best_lr": 0.0384} for s in
            (0.00453, 0.00668, 0.0055)]  # fmt: skip
    sweeps = {"valley_lr": 0.00453, "steepest_lr": 0.0055, "best_lr": 0.0384, "each": each}
    tested = {**plan.measurements["range_test"], "sweeps": sweeps}
    html = render_report(Plan(**{**plan.to_dict(), "measurements": {
        **plan.measurements, "range_test": tested}}))  # fmt: skip
    # the figure marks the first sweep's steepest descent, 0.00453; the reason names 0.0055
    assert (
        "Drawn: the first of 3 sweeps, with its own suggestions; the plan used their medians "
        "(valley 0.00453, steepest descent 0.0055, lowest loss at 0.0384)." in html
    )


def test_the_throughput_caption_of_a_plan_over_devices_says_the_batch_is_per_device():
    plan = make_plan()
    bounded = {**plan.measurements["throughput"], "limit_batch": 256, "limit_reason": "noise_scale"}
    html = render_report(Plan(**{**plan.to_dict(), "world_size": 4, "micro_batch": 32,
                                 "accumulation_steps": 1, "measurements": {
        **plan.measurements, "throughput": bounded}}))  # fmt: skip
    # digits over 4 devices: noise scale 149, timed up to 256 per device (596 / 4 -> 256)
    assert "The batch is per device: the global batch is spread over the 4 devices." in html
    assert "the power of two at four times it over the 4 devices (the batch above" in html
    assert "per device" not in render_report(plan)
