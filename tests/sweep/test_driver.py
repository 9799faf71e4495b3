"""run_sweep on the digits example: a tiny grid, the CSV, resume, the folder's identity."""

from __future__ import annotations

import json

import pytest

from batchfit.errors import ConfigError
from batchfit.sweep.driver import SweepConfig, run_sweep
from batchfit.sweep.trial import TrialSpec, run_trial

DIGITS = "batchfit.examples.digits:task"


def _config(**options):
    base = dict(batch_sizes=(64, 128), seeds=1, widen=0, workers=1, noise_scale=False)
    return SweepConfig("val_accuracy>=0.9", **(base | options))


def test_two_batches_three_rates_one_seed(tmp_path):
    calls = []
    result = run_sweep(
        DIGITS, _config(), out_dir=tmp_path, progress=lambda *call: calls.append(call)
    )
    assert [point.batch for point in result.points] == [64, 128]
    assert result.trials_run == 6 and result.trials_resumed == 0
    assert all(len(point.rates) == 3 for point in result.points)
    for point in result.points:
        # the grid is centred on the sqrt-scaled rate (Adam), a factor 2 either side
        assert point.rates == pytest.approx(
            (point.scaled_lr / 2, point.scaled_lr, point.scaled_lr * 2)
        )
        assert point.steps is not None and point.best_lr in point.rates
    assert result.lr_rule == "sqrt"
    assert result.samples == sum(t.steps_run * t.batch for t in result.trials)
    assert calls[-1] == ("trials", 6, 6)
    lines = (tmp_path / "trials.csv").read_text().splitlines()
    assert len(lines) == 7 and lines[0].startswith("batch,lr,seed,steps")
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["points"][0]["batch"] == 64 and "critical_batch" in saved


def test_pruned_trials_stop_at_twice_the_best(tmp_path):
    result = run_sweep(DIGITS, _config(), out_dir=tmp_path)
    for point in result.points:
        trials = [t for t in result.trials if t.batch == point.batch]
        first = next(t for t in trials if t.lr == point.scaled_lr)
        for trial in trials:
            if trial is not first:  # wave 2 is capped by wave 1's steps
                assert trial.cap_steps == 2 * first.steps
                assert trial.steps_run <= trial.cap_steps


def test_resume_skips_finished_trials(tmp_path):
    first = run_sweep(DIGITS, _config(), out_dir=tmp_path)
    again = run_sweep(DIGITS, _config(), out_dir=tmp_path)
    assert (again.trials_run, again.trials_resumed) == (0, 6)
    assert [p.steps for p in again.points] == [p.steps for p in first.points]
    # an interrupted sweep: one trial's file missing, only that one runs again
    missing = sorted((tmp_path / "trials").glob("b128_*.json"))[0]
    missing.unlink()
    resumed = run_sweep(DIGITS, _config(), out_dir=tmp_path)
    assert (resumed.trials_run, resumed.trials_resumed) == (1, 5)
    assert missing.exists()


@pytest.mark.parametrize("damage", ["", '{"batch": 128}', "[1, 2]", '{"batch": 128, "lr": "x"'])
def test_a_damaged_trial_file_runs_again_and_is_rewritten(tmp_path, damage):
    run_sweep(DIGITS, _config(), out_dir=tmp_path)
    damaged = sorted((tmp_path / "trials").glob("b128_*.json"))[0]
    good = json.loads(damaged.read_text())
    damaged.write_text(damage)
    resumed = run_sweep(DIGITS, _config(), out_dir=tmp_path)
    assert (resumed.trials_run, resumed.trials_resumed) == (1, 5)
    assert {k: v for k, v in json.loads(damaged.read_text()).items() if k != "seconds"} == {
        k: v for k, v in good.items() if k != "seconds"
    }


@pytest.mark.parametrize("damage", ["{", "[]"])
def test_a_damaged_sweep_identity_names_the_file_and_the_fix(tmp_path, damage):
    (tmp_path / "sweep.json").write_text(damage)
    with pytest.raises(ConfigError, match=r"sweep.json' cannot be read .*delete it .*--out"):
        run_sweep(DIGITS, _config(), out_dir=tmp_path)


def test_a_sweep_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        run_sweep(DIGITS, _config(), out_dir=tmp_path / "afile")


def test_a_folder_of_another_sweep_is_refused(tmp_path):
    run_sweep(DIGITS, _config(batch_sizes=(512, 1024), widen=0), out_dir=tmp_path)
    other = SweepConfig("val_loss<=0.5", batch_sizes=(512, 1024), seeds=1, widen=0, workers=1)
    with pytest.raises(ConfigError, match="holds another sweep.*another --out"):
        run_sweep(DIGITS, other, out_dir=tmp_path)


def test_another_task_of_the_same_name_is_refused_not_mixed(tmp_path):
    # Two of the user's tasks both named "task" (the default), swept into the same folder (the
    # CLI's default is sweep-task for both): the second used to resume the first one's trials.
    import torch
    from torch import nn

    from tests.conftest import make_mlp_task

    def wider() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))

    config = SweepConfig("val_accuracy>=0.6", batch_sizes=(32, 64), seeds=1, widen=0, workers=1,
                         noise_scale=False)  # fmt: skip
    first = run_sweep(make_mlp_task(name="task"), config, out_dir=tmp_path)
    assert first.trials_run == 6
    with pytest.raises(ConfigError, match=r"holds another sweep \(parameters 195 -> 771\)"):
        run_sweep(make_mlp_task(name="task", model=wider), config, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="train_samples 256 -> 192"):
        run_sweep(make_mlp_task(192, name="task"), config, out_dir=tmp_path)
    again = run_sweep(make_mlp_task(name="task"), config, out_dir=tmp_path)
    assert (again.trials_run, again.trials_resumed) == (0, 6)


def test_a_sweep_into_a_folder_leaves_the_callers_random_generators_alone(tmp_path):
    import torch

    from tests.conftest import make_mlp_task

    def unseeded() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

    config = SweepConfig("val_accuracy>=0.3", batch_sizes=(64, 128), seeds=1, widen=0,
                         workers=1, noise_scale=False)  # fmt: skip
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_sweep(make_mlp_task(model=unseeded), config, out_dir=tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_a_folder_written_without_the_sizes_still_resumes(tmp_path):
    run_sweep(DIGITS, _config(batch_sizes=(512, 1024), widen=0), out_dir=tmp_path)
    identity = tmp_path / "sweep.json"
    saved = json.loads(identity.read_text())
    old = {k: saved[k] for k in ("task", "target", "tolerance", "micro_batch")}
    identity.write_text(json.dumps(old))
    again = run_sweep(DIGITS, _config(batch_sizes=(512, 1024), widen=0), out_dir=tmp_path)
    assert (again.trials_run, again.trials_resumed) == (0, 6)


def test_numpy_and_list_batch_sizes_become_a_tuple_of_ints():
    import numpy as np

    config = _config(batch_sizes=[np.int64(64), 128])
    assert config.batch_sizes == (64, 128)
    assert all(type(size) is int for size in config.batch_sizes)


def test_a_diverging_trial_is_a_result_and_the_sweep_goes_on(tmp_path):
    # The loop raised TrainingDivergedError before the trial's callback saw the inf loss: one
    # rate too high for its batch ended the whole sweep with a traceback.
    from batchfit.sweep.target import parse_target
    from tests.conftest import make_mlp_task

    spec = TrialSpec(batch=32, lr=1e6, seed=0, cap_steps=50, micro_batch=32)
    trial = run_trial(make_mlp_task(), spec, parse_target("val_accuracy>=0.9"))
    assert trial.diverged and trial.steps is None and 0 < trial.steps_run < 50
    assert trial.samples == 32 * trial.steps_run
    config = SweepConfig("val_accuracy>=0.6", batch_sizes=(32, 64), seeds=1, widen=0, workers=1,
                         noise_scale=False)  # fmt: skip
    result = run_sweep(make_mlp_task(lr=2e5), config, out_dir=tmp_path)
    assert result.trials_run == 6 and all(t.diverged for t in result.trials)
    assert result.critical_batch is None and "two batch sizes" in result.fit_reason
    meaning = result.describe()
    assert "raise --widen to try lower ones" in meaning and "ease the target" not in meaning.lower()


def test_accumulation_gives_the_same_steps():
    from batchfit.sweep.target import parse_target
    from batchfit.task import load_example

    task, target = load_example("digits"), parse_target("train_loss<=0.4")
    whole = run_trial(task, TrialSpec(64, 0.004, 0, 200, 64), target)
    accumulated = run_trial(task, TrialSpec(64, 0.004, 0, 200, 16), target)
    assert whole.steps is not None
    assert accumulated.steps == whole.steps and accumulated.micro_batch == 16


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"seeds": 0}, "seeds must be"),
        ({"cap_factor": 0.5}, "cap_factor"),
        ({"batch_sizes": ()}, "empty"),
        ({"batch_sizes": (8, "x")}, "not a positive whole number"),
        ({"batch_sizes": ("16", "32")}, "'16' in the grid is not a positive whole number"),
        (
            {"batch_sizes": "16,32"},
            r"list or tuple of whole numbers, got '16,32'; e.g. batch_sizes=",
        ),
        ({"batch_sizes": 16}, "list or tuple of whole numbers, got 16"),
        ({"batch_sizes": (16, 2.5)}, "2.5 in the grid is not a positive whole number"),
        ({"ray_address": "nowhere"}, "HOST:PORT"),
        (
            {"ray_address": "auto", "workers": 4},
            r"--workers 4 does nothing with --ray-address auto: .*give one of --workers and",
        ),
        ({"lr_rule": "cubic"}, "linear, sqrt, none"),
    ],
)
def test_bad_options_raise_with_the_fix(options, words):
    with pytest.raises(ConfigError, match=words):
        _config(**options)


def test_a_grid_larger_than_the_data_is_refused():
    with pytest.raises(ConfigError, match="larger than the training data"):
        run_sweep(DIGITS, _config(batch_sizes=(64, 4096)))


def test_the_seed_range_of_b_crit_names_an_end_beyond_the_grid():
    # A seed whose steps do not fall with the batch has B_crit below the grid; it used to
    # read as "unbounded" above, the wrong end.
    from batchfit.sweep.driver import _fits, _Trials
    from batchfit.sweep.fit import fit_steps
    from batchfit.sweep.result import BatchPoint
    from batchfit.sweep.trial import TrialResult

    per_seed = {0: {64: 100, 128: 70, 256: 55}, 1: {64: 40, 128: 40, 256: 40}}
    trials = _Trials()
    for seed, steps in per_seed.items():
        for batch, value in steps.items():
            trials.add(
                TrialResult(batch, 0.01, seed, 999, batch, value, value, 0, 0.9, False, 3, 0)
            )
    points = [
        BatchPoint(b, (per_seed[0][b] + per_seed[1][b]) / 2, 40, per_seed[0][b], 0.01, 0.01,
                   (0.01,), 2)
        for b in (64, 128, 256)
    ]  # fmt: skip
    fit, reason, low, high = _fits(points, trials, (0, 1))
    assert fit.critical_batch is not None and reason == ""
    seed0 = fit_steps([64, 128, 256], [100, 70, 55]).critical_batch
    assert low == 0.0 and high == pytest.approx(seed0)


class _Engine(Exception):
    """Raised by the fake engine: the sweep reached the trials."""


@pytest.mark.parametrize(
    ("options", "refused"),
    [({}, None), ({"workers": 1}, None), ({"workers": 2}, "--workers 2"),
     ({"ray_address": "local"}, "--ray-address")],
)  # fmt: skip
def test_a_sweep_on_another_device_trains_in_this_process(options, refused, monkeypatch):
    # The trials of a sweep on cuda ran in worker processes, on the CPU, without a word.
    import torch

    import batchfit.devices
    import batchfit.sweep.engines as engines

    seen = {}

    def engine(source, specs, target, *, tolerance, workers, ray_address, device):
        seen.update(workers=workers, device=device)
        raise _Engine

    monkeypatch.setattr(batchfit.devices, "resolve_device", lambda name: torch.device("cuda", 0))
    monkeypatch.setattr(engines, "run_trials", engine)
    config = SweepConfig("val_accuracy>=0.9", batch_sizes=(64,), seeds=1, noise_scale=False,
                         **options)  # fmt: skip
    if refused is None:
        with pytest.raises(_Engine):
            run_sweep(DIGITS, config, device="cuda")
        assert seen == {"workers": 1, "device": torch.device("cuda", 0)}
    else:
        with pytest.raises(ConfigError, match=rf"device cuda:0 .*{refused} .*--workers 1"):
            run_sweep(DIGITS, config, device="cuda")
        assert not seen


def test_a_grid_of_one_batch_says_to_add_one_not_to_ease_the_target():
    # The reason read "1 reached the target. Lower the target or widen the batch grid.": the
    # target was met, and lowering a loss target makes it harder.
    from tests.conftest import make_mlp_task

    config = SweepConfig("val_accuracy>=0.6", batch_sizes=(32,), seeds=1, widen=0, workers=1,
                         noise_scale=False)  # fmt: skip
    result = run_sweep(make_mlp_task(), config)
    assert result.points[0].steps is not None and result.fit is None
    assert "the grid has one (32): give two or more, e.g. --batch-sizes 32,64" in result.fit_reason
    assert "Lower the target" not in result.describe()


def test_a_target_met_at_step_one_everywhere_gives_no_best_rate_exponent():
    # Every rate reached the target at step 1: the "best" rate was the lowest one at each batch
    # (a tie), and its slope, the rule's own exponent, was shown as the best-rate exponent.
    from tests.conftest import make_mlp_task

    config = SweepConfig("val_loss<=100", batch_sizes=(16, 64), seeds=1, widen=0, workers=1,
                         noise_scale=False)  # fmt: skip
    result = run_sweep(make_mlp_task(), config)
    assert [point.steps for point in result.points] == [1.0, 1.0]
    assert result.lr_exponent is None
    assert ("best-rate exponent", "-") in result.summary_rows()


def test_a_micro_batch_that_does_not_divide_a_batch_is_refused_before_any_trial(monkeypatch):
    # Every trial failed in turn with the loop's advice: "a global batch of 30 or 36, or allow
    # uneven micro-batches (--allow-uneven ...)", neither of which the sweep takes.
    import batchfit.sweep.engines as engines

    def engine(*args, **kwargs):
        raise AssertionError("a trial ran")

    monkeypatch.setattr(engines, "run_trials", engine)
    config = SweepConfig("val_accuracy>=0.9", batch_sizes=(4, 16, 32), seeds=1, micro_batch=6,
                         workers=1, noise_scale=False)  # fmt: skip
    with pytest.raises(ConfigError, match=r"--micro-batch 6 does not divide the grid's batch "
                                          r"16, 32; .* e\.g\. --micro-batch 4\.$"):  # fmt: skip
        run_sweep(DIGITS, config)


def test_a_folder_whose_sweep_finished_no_trial_is_taken_by_another(tmp_path, monkeypatch):
    # A sweep whose first trial failed left sweep.json alone in its folder; the rerun with the
    # task fixed (another model size) or another target was refused as "holds another sweep".
    import batchfit.sweep.engines as engines

    def failing(*args, **kwargs):
        raise ConfigError("the first trial failed")

    config = SweepConfig("val_accuracy>=0.9", batch_sizes=(512, 1024), seeds=1, widen=0,
                         workers=1, noise_scale=False)  # fmt: skip
    with monkeypatch.context() as patch:
        patch.setattr(engines, "run_trials", failing)
        with pytest.raises(ConfigError, match="first trial failed"):
            run_sweep(DIGITS, config, out_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.json"]
    other = SweepConfig(**{**config.to_dict(), "target": "val_loss<=1.5"})
    result = run_sweep(DIGITS, other, out_dir=tmp_path)
    assert result.trials_run == 6
    assert json.loads((tmp_path / "sweep.json").read_text())["target"] == "val_loss<=1.5"
    # once it holds trials, the folder is that sweep's: another is refused
    with pytest.raises(ConfigError, match=r"holds another sweep \(target 'val_loss<=1.5' -> "):
        run_sweep(DIGITS, config, out_dir=tmp_path)


def test_a_trial_with_a_nan_metric_is_saved_as_strict_json_and_read_back(tmp_path):
    # trials/*.json held `"metric": NaN` (a diverged model's val_loss), which jq, JavaScript
    # and strict parsers refuse; it is null now, and the trial still reads back.
    from batchfit.sweep.store import SweepStore
    from batchfit.sweep.trial import TrialResult

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    store = SweepStore(tmp_path, {"task": "t"})
    trial = TrialResult(
        batch=16, lr=0.1, seed=0, cap_steps=10, micro_batch=16, steps=None, steps_run=10,
        samples=160, metric=float("nan"), diverged=True, evaluations=2, seconds=0.5,
    )  # fmt: skip
    path = store.save(trial)
    assert json.loads(path.read_text(), parse_constant=refuse)["metric"] is None
    spec = TrialSpec(batch=16, lr=0.1, seed=0, cap_steps=10, micro_batch=16)
    assert store.load(spec).metric is None
