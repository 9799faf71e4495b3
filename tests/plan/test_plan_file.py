import json

import pytest

from batchfit.errors import CheckpointError, ConfigError
from batchfit.plan.plan_file import PLAN_SCHEMA_VERSION, Plan, load_plan, plan_from_dict


def make_plan(**overrides) -> Plan:
    options = dict(
        task="digits",
        device="cpu",
        world_size=1,
        global_batch=256,
        micro_batch=32,
        accumulation_steps=8,
        lr=0.0028,
        lr_rule="sqrt",
        warmup_steps=20,
        reasons={"micro_batch": "the largest multiple of 8 that fits"},
    )
    options.update(overrides)
    return Plan(**options)


def test_round_trip(tmp_path):
    plan = make_plan(measurements={"memory": {"limit": 300}})
    path = plan.save(tmp_path / "out" / "plan.json")
    assert load_plan(path) == plan
    assert json.loads(path.read_text())["schema_version"] == PLAN_SCHEMA_VERSION
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temporary left behind


def test_the_folder_a_plan_was_written_to_stands_for_its_plan_json(tmp_path):
    plan = make_plan()
    plan.save(tmp_path / "out" / "plan.json")
    assert load_plan(tmp_path / "out") == plan
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is a folder without a plan.json"):
        load_plan(tmp_path / "empty")


def test_inconsistent_batch_names_the_product():
    with pytest.raises(ConfigError, match=r"32 x 4 x 1 = 128"):
        make_plan(accumulation_steps=4)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("lr", -1.0, "positive"),
        ("lr_rule", "cubic", "linear, sqrt, none"),
        ("optimizer", "adam9", "lars"),
        ("micro_batch", 0, "at least 1"),
        ("warmup_steps", -5, "at least 0"),
        # 1e300 or Infinity overflowed in the first optimizer step (a traceback)
        ("lr", 1e300, "float32"),
        ("lr", float("inf"), "float32"),
        ("lr", float("nan"), "positive"),
        ("warmup_steps", True, "at least 0"),  # a bool is not a step count
    ],
)
def test_bad_field_names_field_value_and_fix(field, value, words):
    # a bad argument to Plan(...) is a ConfigError; the same value read from a file is a fault
    # of the file, a CheckpointError that names the file
    with pytest.raises(ConfigError) as caught:
        make_plan(**{field: value})
    assert not isinstance(caught.value, CheckpointError)
    assert repr(field) in str(caught.value) and repr(value) in str(caught.value)
    assert words in str(caught.value)
    with pytest.raises(CheckpointError) as caught:
        plan_from_dict(make_plan().to_dict() | {field: value}, source="plan.json")
    assert str(caught.value).startswith("plan.json: field " + repr(field))
    assert words in str(caught.value)


def test_future_version_is_refused(tmp_path):
    data = make_plan().to_dict() | {"schema_version": PLAN_SCHEMA_VERSION + 1}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="upgrade batchfit"):
        load_plan(path)


def test_another_json_file_given_as_a_plan_is_called_not_a_plan(tmp_path):
    # A run's diagnosis.json or train --json output: it said only that schema_version is None.
    path = tmp_path / "diagnosis.json"
    path.write_text(json.dumps({"findings": [], "source": "runs/x/metrics.jsonl", "steps": 9}))
    with pytest.raises(CheckpointError, match=r"not a plan .*findings, source, steps\); give"):
        load_plan(path)
    del_version = make_plan().to_dict()
    del del_version["schema_version"]  # a plan with its version cut out still says which field
    with pytest.raises(CheckpointError, match="'schema_version' is None"):
        plan_from_dict(del_version)


def test_missing_unknown_and_malformed(tmp_path):
    data = make_plan().to_dict()
    del data["lr"]
    with pytest.raises(CheckpointError, match="lr"):
        plan_from_dict(data)
    with pytest.raises(CheckpointError, match="unknown field"):
        plan_from_dict(make_plan().to_dict() | {"batch": 3})
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_plan(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_plan(tmp_path / "missing.json")


def test_batch_schedule_round_trips_and_a_version_1_plan_loads_constant(tmp_path):
    plan = make_plan(batch_schedule="noise", max_global_batch=1024)
    assert load_plan(plan.save(tmp_path / "plan.json")) == plan
    old = make_plan().to_dict()
    del old["batch_schedule"], old["max_global_batch"]
    old["schema_version"] = 1  # written before plans proposed a schedule
    loaded = plan_from_dict(old)
    assert (loaded.batch_schedule, loaded.max_global_batch) == ("constant", None)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"batch_schedule": "grow"}, r"'batch_schedule' is 'grow'.*noise"),
        ({"batch_schedule": "noise", "max_global_batch": 0}, r"'max_global_batch' is 0"),
        (
            {"batch_schedule": "noise", "max_global_batch": 128},
            r"'max_global_batch' is 128; .*from global_batch \(256\), so it must be at least",
        ),
    ],
)
def test_bad_batch_schedule_names_field_and_forms(changes, words):
    with pytest.raises(ConfigError, match=words):
        make_plan(**changes)


def test_a_plan_for_another_training_set_size_is_refused():
    from dataclasses import replace
    from types import SimpleNamespace

    from batchfit.plan.plan_file import check_plan_task

    plan = make_plan(task_name="digits", total_steps=57, train_samples=1438)
    task = SimpleNamespace(name="digits", train_data=range(300))
    with pytest.raises(CheckpointError) as caught:
        check_plan_task(plan, task)
    assert "training set of 1,438 samples; this task's has 300" in str(caught.value)
    assert "57 steps" in str(caught.value) and "--force-plan" in str(caught.value)
    check_plan_task(plan, SimpleNamespace(name="digits", train_data=range(1438)))
    check_plan_task(replace(plan, train_samples=None), task)  # a plan before schema 3


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "1438"])
def test_train_samples_must_be_a_positive_whole_number(value):
    with pytest.raises(ConfigError, match="'train_samples'"):
        make_plan(train_samples=value)


def test_float32_max_is_torchs():
    import torch

    from batchfit.plan.plan_file import FLOAT32_MAX

    assert FLOAT32_MAX == torch.finfo(torch.float32).max
    assert make_plan(lr=1e6).lr == 1e6  # huge but finite: a run that diverges, not refused
