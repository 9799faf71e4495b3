"""The report's figures mark what the plan chose."""

from __future__ import annotations

from batchfit.plan.plan_file import Plan
from batchfit.report.html import render_report
from tests.report.test_report import make_plan


def test_the_throughput_figure_marks_the_chosen_batch_per_device(monkeypatch):
    # `batchfit plan --example digits --quick`: the table chose 128 from the throughput (+26% at
    # 64, +4% at 256) while its figure marked only the knee (256) and the best (512)
    import batchfit.report.html as html_module

    drawn = []
    real = html_module.throughput_png
    monkeypatch.setattr(
        html_module,
        "throughput_png",
        lambda data, **options: drawn.append(options) or real(data, **options),
    )
    plan = make_plan()
    render_report(plan)
    render_report(Plan(**{**plan.to_dict(), "world_size": 4, "micro_batch": 32,
                          "accumulation_steps": 1}))  # fmt: skip
    assert [options["chosen"] for options in drawn] == [
        (128, "chosen global batch 128"),
        (32, "chosen: 32 per device (global batch 128)"),
    ]
