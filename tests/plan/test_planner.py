import json
import math

import pytest

from batchfit.cli.main import main
from batchfit.errors import ConfigError, DoesNotFitError
from batchfit.plan.plan_file import load_plan
from batchfit.plan.planner import plan
from batchfit.task import load_example
from tests.conftest import make_mlp_task
from tests.report.test_report import open_in_chromium

QUICK = {"noise_batches": 8, "range_test_steps": 40}
TINY_TASK = "tests/conftest.py:make_mlp_task"


@pytest.fixture(scope="module")
def tiny_plan():
    return plan(make_mlp_task(samples=512), device="cpu", memory_budget="64KiB", **QUICK)


def test_a_plan_under_a_budget_says_its_throughput_is_this_machines(tiny_plan):
    note = next(n for n in tiny_plan.notes if "throughput was timed on this cpu" in n)
    assert "the budgeted device's" in note and "batchfit throughput" in note


def test_plan_is_exact_and_explained(tiny_plan):
    result = tiny_plan
    assert result.global_batch == result.micro_batch * result.accumulation_steps
    assert result.micro_batch <= result.measurements["memory"]["limit_batch"]
    for key in (
        "global_batch",
        "micro_batch",
        "accumulation_steps",
        "lr",
        "warmup_steps",
        "optimizer",
        "normalization",
    ):
        assert result.reasons[key], key
    assert str(result.micro_batch) in result.reasons["accumulation_steps"]
    assert set(result.measurements) - {"rate_trials"} == {
        "memory",
        "throughput",
        "noise_scale",
        "noise_trend",
        "range_test",
        "loop_overhead",
    }
    # The training loop's own cost per step was timed and, when it counts, enters the choice.
    overhead = result.measurements["loop_overhead"]
    assert overhead["batch"] in result.measurements["throughput"]["batch_sizes"]
    if overhead["loop_seconds"] is None:  # other load bent the bare steps: said, not counted
        assert overhead["skipped"] and overhead["seconds_per_step"] == 0
    else:
        assert overhead["loop_seconds"] > 0 and overhead["seconds_per_step"] >= 0
    if "minimises the estimated time" in result.reasons["global_batch"]:
        loop_named = "the training loop's own" in result.reasons["global_batch"]
        assert loop_named == (overhead["seconds_per_step"] > 0)
    # A rate raised above the rule's was tried in the planned run's first steps.
    assert ("rate_trials" in result.measurements) == ("raised" in result.reasons["lr"])
    trend = result.measurements["noise_trend"]
    # 10 epochs of 512 samples at batch 32: the middle is step 80, before the default points'
    # geometric mean (100): measured at half and twice it
    assert [point["step"] for point in trend["points"]] == [40, 160]
    assert result.measurements["memory"]["trials"], "the limit was confirmed by real steps"
    assert result.lr > 0 and result.lr_rule == "linear"  # the tiny task uses SGD


def test_plan_reaches_a_target_over_devices():
    result = plan(
        make_mlp_task(samples=512),
        device="cpu",
        memory_budget="64KiB",
        world_size=2,
        target_global_batch=128,
        **QUICK,
    )
    assert result.global_batch == 128
    assert result.micro_batch * result.accumulation_steps * 2 == 128
    assert result.reasons["global_batch"] == "the target you asked for"
    assert "loop_overhead" not in result.measurements  # the target needs no time model
    # the throughput was timed here, but the target, not the throughput, set the global batch
    (note,) = [n for n in result.notes if "throughput was timed on this cpu" in n]
    assert "trades steps" not in note and "the target you asked for" in note


def test_plan_advises_groupnorm_for_small_batchnorm_batches():
    task = load_example("cnn")
    result = plan(task, device="cpu", target_global_batch=16, **QUICK)
    assert result.normalization == "groupnorm"
    assert "16 samples per call" in result.reasons["normalization"]


def test_plan_bad_inputs():
    task = make_mlp_task(samples=64)
    with pytest.raises(ConfigError, match="larger than the training set"):
        plan(task, device="cpu", target_global_batch=100, **QUICK)
    with pytest.raises(ConfigError, match="cannot be split equally"):
        plan(task, device="cpu", target_global_batch=33, world_size=2, **QUICK)
    with pytest.raises(DoesNotFitError):
        plan(task, device="cpu", memory_budget="1KiB", **QUICK)


@pytest.mark.integration
def test_cli_plan_then_train_with_it(tmp_path, capsys):
    out = tmp_path / "plan"
    code = main(["plan", TINY_TASK, "--memory-budget", "64KiB", "--out", str(out), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["plan_path"] == str(out / "plan.json")
    written = load_plan(out / "plan.json")
    assert written.global_batch == printed["plan"]["global_batch"]
    seen = open_in_chromium(out / "report.html")  # the real report renders, every image loads
    assert seen["problems"] == [] and len(seen["images"]) == 4
    assert all(done and width > 0 for done, width in seen["images"])
    run = tmp_path / "run"
    code = main(
        [
            "train",
            TINY_TASK,
            "--plan",
            str(out / "plan.json"),
            "--steps",
            "3",
            "--out",
            str(run),
            "--json",
        ]
    )
    assert code == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["global_batch"] == written.global_batch
    assert trained["micro_batch"] == written.micro_batch
    assert trained["lr"] == pytest.approx(written.lr)


def test_cli_plan_bad_inputs_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "plan"
    code = main(["plan", TINY_TASK, "--memory-budget", "1KiB", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("batchfit: error:")
    assert not out.exists(), "nothing is written when planning fails"
    broken = tmp_path / "plan.json"
    broken.write_text('{"schema_version": 99}')
    code = main(["train", TINY_TASK, "--plan", str(broken), "--steps", "1"])
    assert code == 2 and "upgrade batchfit" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits", "cnn", "unet", "charlm"])
def test_plan_every_example(name, tmp_path):
    code = main(["plan", "--example", name, "--out", str(tmp_path), "--memory-budget", "300MiB"])
    assert code == 0
    assert load_plan(tmp_path / "plan.json").task == name


def test_planner_and_train_config_agree_on_the_run_length_and_warmup():
    from batchfit.training.config import TrainConfig, resolve_setup

    # 300 samples at a global batch of 64: 10 epochs are 46.9 steps, so a planner that counted
    # whole batches per epoch (5 x 10 = 50) would disagree with training (47).
    task = make_mlp_task(samples=300, lr=0.01)
    planned = plan(task, device="cpu", target_global_batch=64, epochs=10, **QUICK)
    config = TrainConfig(
        global_batch=planned.global_batch, micro_batch=planned.micro_batch, epochs=10,
        lr=planned.lr,
    )  # fmt: skip
    setup = resolve_setup(task, config)
    assert planned.total_steps == setup.total_steps == 47
    assert planned.warmup_steps == setup.warmup_steps


def test_plan_refuses_a_run_length_that_is_not_positive():
    with pytest.raises(ConfigError, match="epochs must be a positive number"):
        plan(make_mlp_task(samples=64), device="cpu", epochs=0, **QUICK)


@pytest.mark.parametrize(("measured", "proposed"), [(16.0, "noise"), (400.0, "constant")])
def test_plan_proposes_a_schedule_from_the_measured_noise_scale(
    measured, proposed, monkeypatch, tmp_path, capsys
):
    import dataclasses

    import batchfit.noise.measure as measure

    real = measure.measure_noise_scales

    def synthetic(*args, **kwargs):  # the real measurements, with the noise scale replaced
        return tuple(
            dataclasses.replace(point, noise_scale_samples=measured, reliable=True)
            for point in real(*args, **kwargs)
        )

    monkeypatch.setattr(measure, "measure_noise_scales", synthetic)
    # 2048 samples planned at 16 per step: room min(512, 16 x 8) = 128 samples.
    planned = plan(
        make_mlp_task(samples=2048), device="cpu", target_global_batch=16, epochs=1, **QUICK
    )
    assert planned.batch_schedule == proposed
    assert f"({measured:.0f})" in planned.reasons["batch_schedule"]
    path = planned.save(tmp_path / "plan.json")
    # TINY_TASK's 256 samples, not the 2048 planned for: --force-plan
    code = main(["train", TINY_TASK, "--plan", str(path), "--steps", "2", "--out",
                 str(tmp_path / "run"), "--json", "--force-plan"])  # fmt: skip
    assert code == 0
    assert json.loads(capsys.readouterr().out)["batch_schedule"] == proposed


def test_a_growing_batch_advises_on_batchnorm_at_the_micro_batch_the_run_starts_with(
    monkeypatch,
):
    import dataclasses

    import batchfit.noise.measure as measure
    from tests.conftest import make_bn1d_task

    real = measure.measure_noise_scales

    def synthetic(*args, **kwargs):  # a noise scale far below the room: the `noise` schedule
        return tuple(
            dataclasses.replace(point, noise_scale_samples=4.0, reliable=True)
            for point in real(*args, **kwargs)
        )

    monkeypatch.setattr(measure, "measure_noise_scales", synthetic)
    planned = plan(make_bn1d_task(samples=2048), device="cpu", target_global_batch=32, **QUICK)
    assert planned.batch_schedule == "noise"
    assert (planned.micro_batch, planned.accumulation_steps) == (32, 1)
    # train --plan starts at 2 micro-batches of 16 (two per step measure the noise scale): the
    # plan said "keep BatchNorm: 1 BatchNorm layer see 32 samples per call"
    assert planned.normalization == "groupnorm"
    assert "see only 16 samples per call" in planned.reasons["normalization"]
    assert "first steps as 2 micro-batches of 16" in planned.reasons["micro_batch"]


@pytest.mark.parametrize(("measured", "largest_timed"), [(6.0, 32), (100.0, 512), (600.0, None)])
def test_the_throughput_is_timed_up_to_what_the_noise_scale_lets_the_plan_choose(
    measured, largest_timed, monkeypatch
):
    """The plan chooses at most twice the noise scale and names the batch twice its choice:
    with a noise scale of 6 nothing above 32 is timed (24 rounds up to 32), with 100 nothing
    above 512; with 600 (2400 would be timed) the ladder may run to the data's 2048 samples."""
    import dataclasses

    import batchfit.noise.measure as measure

    real = measure.measure_noise_scales

    def synthetic(*args, **kwargs):  # flat: the trend is the measured value
        return tuple(
            dataclasses.replace(point, noise_scale_samples=measured, reliable=True)
            for point in real(*args, **kwargs)
        )

    monkeypatch.setattr(measure, "measure_noise_scales", synthetic)
    planned = plan(make_mlp_task(samples=2048), device="cpu", epochs=1, **QUICK)
    throughput = planned.measurements["throughput"]
    assert planned.global_batch <= 2 * measured
    if largest_timed is not None:
        assert max(throughput["batch_sizes"]) <= largest_timed
        assert throughput["limit_batch"] == largest_timed
        assert throughput["limit_reason"] == "noise_scale"
    else:
        assert throughput["limit_reason"] in (None, "dataset", "max_batch_size")


def test_without_a_reliable_noise_scale_the_loop_is_not_timed(monkeypatch):
    import dataclasses

    import batchfit.noise.measure as measure

    real = measure.measure_noise_scales

    def unreliable(*args, **kwargs):
        return tuple(dataclasses.replace(p, reliable=False) for p in real(*args, **kwargs))

    monkeypatch.setattr(measure, "measure_noise_scales", unreliable)
    planned = plan(make_mlp_task(samples=512), device="cpu", **QUICK)
    # the reference batch stands in; no time model, so nothing to count the loop's cost in
    assert "reference batch" in planned.reasons["global_batch"]
    assert "loop_overhead" not in planned.measurements


def test_a_disturbed_throughput_curve_is_named_in_the_plan(monkeypatch):
    import dataclasses

    import batchfit.throughput.measure as measure

    real = measure.measure_throughput

    def disturbed(*args, **kwargs):  # the second size's steps 5x slower than they were
        result = real(*args, **kwargs)
        seconds = list(result.seconds_per_step)
        seconds[1] *= 5
        return dataclasses.replace(
            result,
            seconds_per_step=tuple(seconds),
            samples_per_second=tuple(b / s for b, s in zip(result.batch_sizes, seconds)),
        )

    monkeypatch.setattr(measure, "measure_throughput", disturbed)
    planned = plan(make_mlp_task(samples=256), device="cpu", target_global_batch=32, **QUICK)
    notes = [note for note in planned.notes if "step time fell as the batch grew" in note]
    assert len(notes) == 1 and "The global batch below rests on it." in notes[0]


def test_a_full_plan_chooses_from_the_noise_trend():
    result = plan(load_example("digits"), device="cpu", noise_batches=12, range_test_steps=40)
    trend = result.measurements["noise_trend"]["trend"]
    assert (
        trend is not None
        and trend["at_samples"] == 10 * len(load_example("digits").train_data) // 2
    )
    reason = result.reasons["global_batch"]
    assert "after 50 and 200 warm-up steps" in reason and "middle of the planned run" in reason
    assert f"about {trend['noise_scale_samples']:.0f} samples" in reason
    (closing,) = [note for note in result.notes if note.startswith("The noise scale grows")]
    if result.batch_schedule == "noise":
        assert "the plan's `noise` batch schedule raises" in closing
    else:  # digits: 359 samples leave the batch 256 no room to double
        assert "--batch-schedule noise" in closing or "no room to double" in closing
    assert not any("raised later" in note for note in result.notes)
    # three range-test sweeps over different sample orders; the median of each suggestion
    sweeps = result.measurements["range_test"]["sweeps"]
    assert len(sweeps["each"]) == 3
    lowest = sorted(sweep["best_lr"] for sweep in sweeps["each"])
    assert sweeps["best_lr"] == lowest[1] and len(set(lowest)) > 1
    if "range test" in result.reasons["lr"]:
        assert "medians of 3 sweeps" in result.reasons["lr"]


def test_a_short_run_is_measured_within_it():
    """The noise scale grows as the loss falls: a plan for a run shorter than the default
    warm-up (50 and 200 steps) measures at half and twice the run's middle, not after more
    samples than the run will see."""
    task = make_mlp_task(samples=256)  # batch 32: one epoch is 8 steps, its middle 4
    short = plan(task, device="cpu", epochs=1, **QUICK)
    points = short.measurements["noise_trend"]["points"]
    assert [point["step"] for point in points] == [2, 8]
    assert max(point["samples_seen"] for point in points) <= 256
    if short.measurements["noise_trend"]["trend"] is not None:
        assert "after 2 and 8 warm-up steps" in short.reasons["global_batch"]
    quick = plan(task, device="cpu", epochs=1, quick=True, noise_batches=8, range_test_steps=40)
    assert quick.measurements["noise_scale"]["step"] == 4
    assert "at the middle of a shorter run" in quick.notes[0]


def test_a_reference_rate_far_too_low_is_raised_by_a_range_test_that_reaches_divergence():
    # SGD at 3e-3 for batch 32 on the tiny MLP (0.024 at 256 by the linear rule): its loss
    # still falls at 100x that rate (lowest near 5), so a sweep that stopped there could not
    # place the rate; the sweep goes on to where the loss diverges. At a fixed batch: the batch
    # the throughput would choose depends on the machine's load.
    task = make_mlp_task(samples=512, lr=3e-3)
    result = plan(task, device="cpu", quick=True, target_global_batch=256)
    sweep = result.measurements["range_test"]
    assert sweep["stop_reason"] in ("diverged", "not_finite"), sweep["stop_reason"]
    assert max(sweep["lrs"]) > 100 * task.lr * result.global_batch / task.batch_size
    assert result.lr > 10 * task.lr
    assert "raised" in result.reasons["lr"]


def test_a_quick_plan_says_what_it_shortened_and_skips_what_it_does_not_need():
    task = make_mlp_task(samples=512)
    quick = plan(task, device="cpu", quick=True)
    note = next(note for note in quick.notes if note.startswith("Quick plan"))
    assert "one measurement over 12" in note and "one range test of 56 steps" in note
    assert "noise_trend" not in quick.measurements
    assert quick.measurements["range_test"]["steps"] <= 56
    assert len(quick.measurements["range_test"]["sweeps"]["each"]) == 1  # one sweep
    assert "medians" not in quick.reasons["lr"]
    # 12 big batches of 128 cost as much as three passes over the 512 samples: three passes
    noise = quick.measurements["noise_scale"]
    assert noise["whole_passes"] == 3 and noise["batches"] == 3 * 512 // 8
    if quick.measurements["noise_scale"]["reliable"]:
        assert "measured once" in quick.reasons["global_batch"]
    targeted = plan(task, device="cpu", quick=True, target_global_batch=256)
    assert "noise_scale" not in targeted.measurements
    assert any("not measured: the target global batch" in note for note in targeted.notes)
    assert targeted.reasons["batch_schedule"].startswith("the noise scale was not measured")
    # 256 of 512 samples: two steps per epoch
    assert any("above a quarter of the 512 training samples" in n for n in targeted.notes)
    with pytest.raises(ConfigError, match="range_test_steps"):
        plan(task, device="cpu", quick=True, range_test_steps=0)


@pytest.mark.integration
def test_cli_plan_quick(tmp_path, capsys):
    out = tmp_path / "plan"
    code = main(["plan", TINY_TASK, "--quick", "--out", str(out), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert any(note.startswith("Quick plan") for note in printed["plan"]["notes"])


@pytest.mark.integration
def test_cli_plan_for_a_run_length(tmp_path, capsys):
    """--epochs sizes the planned run: its steps cover that many passes over the data."""
    out = tmp_path / "plan"
    assert main(["plan", TINY_TASK, "--quick", "--epochs", "3", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)["plan"]
    samples = 256  # make_mlp_task's training set
    assert printed["total_steps"] == math.ceil(3 * samples / printed["global_batch"])
    assert main(["plan", TINY_TASK, "--epochs", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--epochs" in capsys.readouterr().err


def test_a_quick_plan_says_memory_was_probed_at_fewer_sizes_only_where_it_was():
    task = make_mlp_task(samples=256)
    cpu = plan(task, device="cpu", quick=True, target_global_batch=64)
    probes = len(cpu.measurements["memory"]["probes"])
    assert any(f"(from {probes} batch sizes: a quick plan's)" in note for note in cpu.notes)
    # under a budget the search is not shortened: the quick note said 3 sizes, it probed 6
    budget = plan(task, device="cpu", quick=True, target_global_batch=64, memory_budget="1GiB")
    assert len(budget.measurements["memory"]["probes"]) != 3
    assert not any("batch sizes" in note and "memory" in note for note in budget.notes)


def test_cli_plan_prints_a_train_command_that_runs_from_paths_with_spaces(tmp_path, capsys):
    import shlex
    import shutil

    folder = tmp_path / "my tasks"
    folder.mkdir()
    shutil.copy("tests/conftest.py", folder / "tasks.py")
    out = tmp_path / "the plan"
    task = f"{folder / 'tasks.py'}:make_mlp_task"
    assert main(["plan", task, "--quick", "--target-global-batch", "64", "--out", str(out)]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train:")]
    words = shlex.split(line.removeprefix("train:"))
    assert words == ["batchfit", "train", task, "--plan", str(out / "plan.json")]
