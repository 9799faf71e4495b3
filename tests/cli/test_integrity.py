"""Damaged and mismatched files through `main([...])`: checkpoints (a flipped byte, another
task, truncated, not a checkpoint), plans made for another task, model or training set, a damaged
metrics.jsonl and a bad `noise-scale --checkpoint`. Each is exit 2, one line, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from batchfit.cli.main import main
from batchfit.plan.plan_file import Plan, load_plan, model_identity
from tests.conftest import make_mlp, make_regression_task

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
MLP = f"{CONFTEST}:make_mlp_task"
REGRESSION = f"{CONFTEST}:make_regression_task"
STEPS = ["--global-batch", "32", "--micro-batch", "16", "--steps", "2", "--device", "cpu"]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if "batchfit: error:" in line]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "mlp"
    assert main(["train", MLP, *STEPS, "--checkpoint-every", "1", "--out", str(run)]) == 0
    return run


def _flip_a_weight_byte(run: Path) -> None:
    path = run / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    weight = torch.load(path, weights_only=True)["model"]["0.weight"]
    offset = bytes(data).find(weight.numpy().tobytes()[:64])
    data[offset + 5] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(run: Path) -> None:
    path = run / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _not_a_checkpoint(run: Path) -> None:
    (run / "checkpoint.pt").write_text("this is not a checkpoint\n")


def _damage_metrics(run: Path) -> None:
    path = run / "metrics.jsonl"
    path.write_text(path.read_text().replace("\n", "\n{not json\n", 1))


def _plan(tmp_path: Path, **identity) -> str:
    plan = Plan(
        task="tests/conftest.py:make_mlp_task", device="cpu", world_size=1, global_batch=32,
        micro_batch=16, accumulation_steps=2, lr=0.1, lr_rule="linear", warmup_steps=0,
        total_steps=2, **identity,
    )  # fmt: skip
    return str(plan.save(tmp_path / "plan.json"))


def _mlp_plan(tmp_path: Path) -> str:
    return _plan(tmp_path, task_name="tiny-mlp", **model_identity(make_mlp()))


def _other_model_plan(tmp_path: Path) -> str:
    return _plan(tmp_path, task_name="regression", **model_identity(make_mlp()))


def _other_data_plan(tmp_path: Path) -> str:
    # the regression task's own model, planned for 2,000 samples: its 128 would have run the
    # plan's steps as 16 times the passes, and a micro-batch above 128 was told to lower
    # --micro-batch, a flag the user never gave
    model = make_regression_task().make_model()
    return _plan(tmp_path, task_name="regression", train_samples=2000, **model_identity(model))


# (name, damage to a copy of the finished run, argv after the run folder is known, words)
RESUME = ["train", MLP, *STEPS, "--resume"]
CASES = [
    ("flipped byte", _flip_a_weight_byte, RESUME, "fails its checksum"),
    ("truncated", _truncate, RESUME, "is corrupt or not loadable"),
    ("not a checkpoint", _not_a_checkpoint, RESUME, "is corrupt or not loadable"),
    ("other task", None, ["train", REGRESSION, *STEPS, "--resume"], "another model"),
    ("damaged metrics", _damage_metrics, RESUME, "--drop-unreadable-metrics"),
    ("noise-scale, truncated", _truncate, ["noise-scale", MLP, "--checkpoint"],
     "Cannot read the checkpoint"),
    ("noise-scale, not a checkpoint", _not_a_checkpoint, ["noise-scale", MLP, "--checkpoint"],
     "Cannot read the checkpoint"),
]  # fmt: skip


@pytest.mark.parametrize("name, damage, argv, words", CASES, ids=[case[0] for case in CASES])
def test_a_damaged_or_foreign_checkpoint_is_one_line(
    name, damage, argv, words, finished_run, tmp_path, capsys
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    if damage is not None:
        damage(run)
    target = run / "checkpoint.pt" if argv[0] == "noise-scale" else run
    assert main([*argv, str(target)]) == 2
    assert words in _one_line(capsys)


@pytest.mark.parametrize(
    "make_plan, words",
    [(_mlp_plan, "task 'tiny-mlp', given as tests/conftest.py:make_mlp_task, not 'regression'"),
     (_other_model_plan, "made for another model (fingerprint"),
     (_other_data_plan, "training set of 2,000 samples; this task's has 128")],
)  # fmt: skip
def test_a_plan_from_another_task_is_one_line_and_force_plan_overrides(
    make_plan, words, tmp_path, capsys
):
    plan = make_plan(tmp_path)
    argv = ["train", REGRESSION, "--plan", plan, "--device", "cpu", "--out"]
    assert main([*argv, str(tmp_path / "refused")]) == 2
    line = _one_line(capsys)
    assert words in line and "--force-plan" in line
    assert not (tmp_path / "refused" / "checkpoint.pt").exists()
    assert main([*argv, str(tmp_path / "forced"), "--force-plan", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2


def test_a_plan_made_for_this_task_trains(tmp_path, capsys):
    argv = ["train", MLP, "--plan", _mlp_plan(tmp_path), "--device", "cpu", "--json"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out)["global_batch"] == 32


def test_a_plan_alone_names_its_task(tmp_path, capsys):
    plan = load_plan(_mlp_plan(tmp_path))
    spec = Plan(**{**plan.to_dict(), "task": MLP}).save(tmp_path / "spec.json")
    argv = ["train", "--plan", str(spec), "--device", "cpu", "--out", str(tmp_path / "run")]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["global_batch"] == 32
    named = Plan(**{**plan.to_dict(), "task": "tiny-mlp"}).save(tmp_path / "named.json")
    argv = ["train", "--plan", str(named), "--device", "cpu", "--out", str(tmp_path / "r2")]
    assert main(argv) == 2
    assert "give the task with the plan" in _one_line(capsys)


def test_drop_unreadable_metrics_resumes_over_a_damaged_line(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    _damage_metrics(run)
    resume = ["train", MLP, *STEPS, "--resume", str(run)]
    assert main(resume) == 2
    line = _one_line(capsys)
    assert "line(s) that cannot be read (line 2)" in line
    assert main([*resume, "--drop-unreadable-metrics", "--json"]) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(text)["step"] for text in lines] == [1, 2]
