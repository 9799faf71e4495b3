"""`batchfit scale-lr`: the learning-rate calculator."""

import json

import pytest

from batchfit.cli.main import main


def test_linear_rule_in_words(capsys):
    args = ["scale-lr", "--lr", "0.1", "--batch", "64", "--new-batch", "256", "--rule", "linear"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "0.4"
    assert "0.1 at batch 64 x 256/64 (linear rule, Goyal et al. 2017) = 0.4" in lines[1]
    assert "warm up" in lines[2] and "start factor 0.25" in lines[2]


def test_json_with_the_schedule(capsys):
    args = ["scale-lr", "--lr", "0.1", "--batch", "64", "--new-batch", "256", "--rule", "sqrt"]
    assert main([*args, "--total-steps", "3000", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["lr"] == pytest.approx(0.2) and data["rule"] == "sqrt" and data["warmup"]
    schedule = data["schedule"]
    assert schedule["warmup_steps"] == 150 and schedule["decay"] == "cosine"
    rows = {row["step"]: row for row in schedule["table"]}
    assert rows[0]["lr"] == pytest.approx(0.1)  # warmup starts at the base rate
    assert rows[150]["lr"] == pytest.approx(0.2) and 2999 in rows


def test_rule_follows_the_optimizer_family(capsys):
    base = ["scale-lr", "--lr", "0.001", "--batch", "32", "--new-batch", "128", "--json"]
    assert main([*base, "--optimizer-family", "adam"]) == 0
    assert json.loads(capsys.readouterr().out)["rule"] == "sqrt"
    assert main(base) == 0
    assert json.loads(capsys.readouterr().out)["rule"] == "linear"


@pytest.mark.parametrize(
    ("named", "rule"), [("AdamW", "sqrt"), ("lamb", "sqrt"), ("lars", "linear")]
)
def test_an_optimizer_batchfit_knows_names_its_family(capsys, named, rule):
    base = ["scale-lr", "--lr", "0.001", "--batch", "32", "--new-batch", "128", "--json"]
    assert main([*base, "--optimizer-family", named]) == 0
    assert json.loads(capsys.readouterr().out)["rule"] == rule


def test_task_supplies_the_reference_point(capsys):
    # digits: Adam at 1e-3 for batch 32, so the square-root rule.
    assert main(["scale-lr", "--example", "digits", "--new-batch", "128", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["base_lr"], data["base_batch"], data["rule"]) == (0.001, 32, "sqrt")
    assert data["lr"] == pytest.approx(0.002)


def test_schedule_table_and_warmup_options(capsys):
    args = ["scale-lr", "--lr", "0.1", "--batch", "64", "--new-batch", "64"]
    assert main([*args, "--total-steps", "100", "--warmup", "10%", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["schedule"]["warmup_steps"] == 10
    assert main([*args, "--total-steps", "100", "--warmup", "7", "--decay", "linear"]) == 0
    out = capsys.readouterr().out
    assert "warmup done" in out and "last step" in out and "linear decay" in out


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--rule", "cubic"], "Unknown scaling rule 'cubic'; use one of linear, sqrt, none"),
        (["--lr", "0"], "--lr must lie in (0, 10000], got 0.0"),
        (["--batch", "sixty"], "--batch 'sixty' is not a whole number"),
        (["--optimizer-family", "lbfgs"], "use one of sgd, adam"),
        (
            ["--total-steps", "3000", "--warmup", "5000"],
            "--warmup 5000 steps is more than the run's --total-steps 3000",
        ),
        (["--total-steps", "100", "--decay", "exp"], "Unknown decay 'exp'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, extra, words):
    args = ["scale-lr", "--lr", "0.1", "--batch", "64", "--new-batch", "256"]
    values = dict(zip(args[1::2], args[2::2]))
    values.update(zip(extra[::2], extra[1::2]))
    code = main(["scale-lr", *[item for pair in values.items() for item in pair]])
    err = capsys.readouterr().err
    assert code == 2
    assert words in err and len(err.strip().splitlines()) == 1


def test_needs_a_reference_point(capsys):
    assert main(["scale-lr", "--new-batch", "256"]) == 2
    assert "Give --lr and --batch" in capsys.readouterr().err


def test_plot_the_schedule(capsys, tmp_path):
    args = ["scale-lr", "--lr", "0.1", "--batch", "64", "--new-batch", "256", "--rule", "linear"]
    target = tmp_path / "lr.png"
    assert main([*args, "--total-steps", "300", "--plot", str(target), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plot"] == str(target)
    assert target.read_bytes().startswith(b"\x89PNG")
    assert main([*args, "--plot", str(target)]) == 2
    assert "--plot needs --total-steps" in capsys.readouterr().err


def test_step_decay_drops_every_third_of_the_run_as_train_does(capsys):
    """--decay step failed with "decay='step' needs step_milestones ... or step_every", neither
    of which the command has."""
    args = ["scale-lr", "--lr", "0.1", "--batch", "64", "--new-batch", "64"]
    assert main([*args, "--total-steps", "90", "--decay", "step"]) == 0
    assert "90 steps, x0.1 every 30 steps" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flag", [["--decay", "linear"], ["--warmup", "100"], ["--min-lr-factor", "0.1"]]
)
def test_schedule_flags_without_total_steps_are_refused_not_ignored(flag, capsys):
    """Without --total-steps there is no schedule: --decay, --warmup and --min-lr-factor were
    dropped without a word."""
    args = ["scale-lr", "--lr", "0.1", "--batch", "64", "--new-batch", "256", *flag]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{flag[0]} shapes the schedule, which needs --total-steps" in err
    assert main([*args, "--total-steps", "1000"]) == 0


def test_a_batch_past_8192_names_lars_or_lamb(capsys):
    # Goyal et al.'s rule held to 8k; beyond it the rate alone is not the answer
    base = ["scale-lr", "--lr", "0.1", "--batch", "256"]
    assert main([*base, "--new-batch", "65536"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "25.6" and "use LARS" in out and "--optimizer lars" in out
    assert main([*base, "--new-batch", "16384", "--optimizer-family", "adam", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["optimizer_advice"]["optimizer"] == "lamb"
    assert main([*base, "--new-batch", "8192", "--json"]) == 0
    assert "optimizer_advice" not in json.loads(capsys.readouterr().out)
