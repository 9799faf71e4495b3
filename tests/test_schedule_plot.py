import doctest

import pytest

from batchfit.errors import ConfigError
from batchfit.schedule_plot import plot_schedule
from batchfit.schedules import ScheduleConfig


def test_writes_a_png(tmp_path):
    config = ScheduleConfig(total_steps=5000, warmup_steps=250, decay="step", step_every=1000)
    path = plot_schedule(config, 0.4, tmp_path / "plots" / "lr.png")
    assert path == tmp_path / "plots" / "lr.png"
    assert path.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in path.parent.iterdir()] == ["lr.png"]  # no temporary left behind


def test_bad_input(tmp_path):
    config = ScheduleConfig(total_steps=10)
    with pytest.raises(ConfigError, match="must end in .png"):
        plot_schedule(config, 0.1, tmp_path / "lr.jpg")
    with pytest.raises(ConfigError, match="base_lr"):
        plot_schedule(config, -1, tmp_path / "lr.png")
    assert not (tmp_path / "lr.png").exists()


def test_one_step_schedule(tmp_path):
    assert plot_schedule(ScheduleConfig(total_steps=1), 0.1, tmp_path / "lr.png").exists()


def test_docstring_examples_run():
    import batchfit.schedule_plot

    assert doctest.testmod(batchfit.schedule_plot).failed == 0
