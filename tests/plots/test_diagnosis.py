"""The diagnosis plot: curves with each finding's steps shaded."""

import pytest

from batchfit.errors import ConfigError
from batchfit.monitor.diagnose import diagnose
from batchfit.monitor.history import History
from batchfit.plots.diagnosis import diagnosis_png, plot_diagnosis
from tests.plots.capture import captured


def _history():
    records = [{"step": s, "loss": 2.3 * 0.9**s} for s in range(1, 40)]
    records += [{"step": 40, "loss": None, "val_loss": 1.0, "val_accuracy": 0.5}]
    return History.from_records(records, metric="val_accuracy")


def test_png_from_plain_data_with_a_finding():
    history = _history()
    diagnosis = diagnose(history)
    assert diagnosis.kinds() == ["diverging"]
    png = diagnosis_png(history.to_dict(), diagnosis.to_dict())
    assert png[:4] == b"\x89PNG"


def test_plot_file_is_written_and_must_be_png(tmp_path):
    history = _history()
    path = plot_diagnosis(history, diagnose(history), tmp_path / "d.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match=r"must end in \.png"):
        plot_diagnosis(history, diagnose(history), tmp_path / "d.svg")


def test_legend_and_finding_labels_do_not_overlap(monkeypatch):
    from batchfit.plots import diagnosis as module

    figures = captured(monkeypatch, module)
    records = [{"step": s, "loss": 2.0 / s} for s in range(1, 170)]
    records += [{"step": s, "val_loss": 0.3, "val_accuracy": 0.97} for s in range(16, 170, 16)]
    history = History.from_records(records, metric="val_accuracy")
    finding = {"kind": "batch-below-critical", "severity": "info", "steps": [128, 169]}
    diagnosis_png(history.to_dict(), {"findings": [finding]})
    figure = figures[0]
    figure.tight_layout()
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    left, right = figure.axes
    # the legend is drawn on the metric's axes, the last drawn, so no curve crosses it
    assert left.get_legend() is None and right.get_legend() is not None
    legend = right.get_legend().get_window_extent(renderer)
    (label,) = [t for a in figure.axes for t in a.texts if t.get_text() == finding["kind"]]
    box = label.get_window_extent(renderer)
    assert not legend.overlaps(box)
    assert not legend.overlaps(left.get_window_extent(renderer))  # beside the plot, not on it
    area = left.get_window_extent(renderer)
    assert area.x0 <= box.x0 and box.x1 <= area.x1  # the label stays inside the chart


def test_non_finite_losses_are_marked_where_the_line_has_its_gap(monkeypatch):
    # the table says "not finite from step 31, 10 times": the plot showed only a line ending
    from batchfit.plots import diagnosis as module

    figures = captured(monkeypatch, module)
    records = [{"step": s, "loss": 2.0 / s if s <= 30 else float("nan")} for s in range(1, 41)]
    history = History.from_records(records)
    diagnosis_png(history.to_dict(), diagnose(history).to_dict())
    (axes,) = figures[0].axes
    (marks,) = [line for line in axes.lines if line.get_label() == "loss not finite"]
    assert list(marks.get_xdata()) == list(range(31, 41))


def _figure_of(monkeypatch, history):
    from batchfit.plots import diagnosis as module

    figures = captured(monkeypatch, module)
    diagnosis_png(history.to_dict(), diagnose(history).to_dict())
    return figures[0]


def _lines(axes):
    return {line.get_label(): line for line in axes.get_lines()}


def test_noise_scale_panel_draws_the_noise_scale_against_a_growing_batch(monkeypatch):
    # a `--batch-schedule noise` run: the batch doubles at steps 20 and 40, the noise scale is
    # logged on every line after the first 3 (null before it is reliable)
    records = [
        {
            "step": s,
            "loss": 2.0 / s,
            "noise_scale": None if s <= 3 else 10.0 * s,
            "global_batch": 32 if s < 20 else 64 if s < 40 else 128,
        }
        for s in range(1, 61)
    ]
    figure = _figure_of(monkeypatch, History.from_records(records, global_batch=128))
    loss, panel = figure.axes
    assert panel.get_shared_x_axes().joined(loss, panel)  # the same steps as the curves
    assert panel.get_yscale() == "log" and "samples" in panel.get_ylabel()
    assert panel.get_xlabel() == "optimizer step"
    lines = _lines(panel)
    noise = lines["noise scale B_simple"]
    assert list(noise.get_xdata()) == list(range(1, 61))
    assert list(noise.get_ydata()[3:]) == [10.0 * s for s in range(4, 61)]
    batch = lines["global batch 32 → 128"]
    assert batch.get_drawstyle() == "steps-post"
    assert list(batch.get_ydata()) == [r["global_batch"] for r in records]
    assert [t.get_text() for t in panel.texts] == ["64", "128"]  # each change labelled
    legend = panel.get_legend()
    assert legend is not None and {t.get_text() for t in legend.get_texts()} == set(lines)


def test_noise_scale_panel_with_a_constant_batch_draws_it_flat_over_the_run(monkeypatch):
    records = [{"step": s, "loss": 2.0 / s, "noise_scale": 100.0 + s} for s in range(1, 41)]
    records += [{"step": 40, "val_loss": 0.3, "val_accuracy": 0.9}]
    history = History.from_records(records, metric="val_accuracy", global_batch=32)
    loss, panel, metric = _figure_of(monkeypatch, history).axes
    (batch,) = [line for line in panel.get_lines() if line.get_label() == "global batch 32"]
    assert list(batch.get_xdata()) == [1, 40] and list(batch.get_ydata()) == [32, 32]
    assert metric.get_ylabel() == "val_accuracy"


@pytest.mark.parametrize("noise", [None, "all null"])
def test_no_noise_scale_panel_without_a_logged_noise_scale(monkeypatch, noise):
    # a Lightning CSVLogger run without batchfit's callback logs no noise scale; a run too
    # short for a reliable one logs only nulls: the figure keeps its one panel
    records = [{"step": s, "loss": 2.0 / s, "global_batch": 32} for s in range(1, 41)]
    if noise:
        records = [{**r, "noise_scale": None} for r in records]
    figure = _figure_of(monkeypatch, History.from_records(records, global_batch=32))
    (axes,) = figure.axes
    assert axes.get_xlabel() == "optimizer step"
    assert not any("batch" in line.get_label() for line in axes.get_lines())


def test_noise_scale_panel_marks_the_value_the_batch_was_judged_against(monkeypatch):
    # the digits plan's run: "the noise scale (about 740 samples) is 5.8x the global batch",
    # while the line's last readings jumped to 1,290; the value named is drawn, over its steps
    readings = [300.0] * 60 + [740.0] * 30 + [1290.0] * 10
    records = [{"step": s, "loss": 2.0 / s, "noise_scale": readings[s - 1]} for s in range(1, 101)]
    history = History.from_records(records, global_batch=128)
    diagnosis = diagnose(history).to_dict()
    assert diagnosis["noise_scale_at_end"] == {"noise_scale": 740.0, "first_step": 76,
                                               "last_step": 100}  # fmt: skip
    figure = _figure_of(monkeypatch, history)
    panel = figure.axes[1]
    (judged,) = [line for line in panel.get_lines() if line.get_label().startswith("judged")]
    assert judged.get_label() == "judged: ~740 (median)"
    assert list(judged.get_xdata()) == [76, 100] and list(judged.get_ydata()) == [740.0, 740.0]
    # a run whose batch was not judged (no global batch known) draws no such line
    unknown = History.from_records(records)
    assert diagnose(unknown).to_dict()["noise_scale_at_end"] is None


def test_a_one_line_log_draws_its_one_loss_as_a_dot(monkeypatch):
    # A line through one point draws nothing: the chart of a one-line metrics.jsonl was empty.
    figure = _figure_of(monkeypatch, History.from_records([{"step": 1, "loss": 2.3}]))
    (axes,) = figure.axes
    loss = _lines(axes)["loss"]
    assert loss.get_marker() == "o" and list(loss.get_ydata()) == [2.3]
    many = _figure_of(monkeypatch, _history())
    assert _lines(many.axes[0])["loss"].get_marker() in ("None", None, "")


def test_a_val_loss_with_no_finite_point_is_not_in_the_legend(monkeypatch):
    records = [{"step": s, "loss": 2.0 / s, "val_loss": None} for s in range(1, 20)]
    records += [{"step": 20, "loss": 0.1, "val_loss": float("nan")}]
    figure = _figure_of(monkeypatch, History.from_records(records))
    (axes,) = figure.axes
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["loss"]
    assert not any("nothing to draw" in text.get_text() for text in axes.texts)


def test_a_log_with_no_finite_value_says_there_is_nothing_to_draw(monkeypatch):
    empty = {"name": "val_loss", "steps": [1, 2], "values": [None, None]}
    from batchfit.plots import diagnosis as module

    figures = captured(monkeypatch, module)
    diagnosis_png({"val_loss": empty}, {"findings": []})
    (axes,) = figures[0].axes
    assert axes.get_legend() is None
    assert [text.get_text() for text in axes.texts] == ["nothing to draw: no finite loss or metric"]
