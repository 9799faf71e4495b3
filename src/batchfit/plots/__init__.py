"""Every batchfit picture, drawn from plain data (the results' `to_dict()` shapes).

Each `*_png` function returns PNG bytes (the report inlines them); each `plot_*` function
takes a result object and writes a PNG file atomically (the CLI's `--plot`). matplotlib's
object interface on the Agg canvas only, so no pyplot state is touched or left behind.
"""

from batchfit.plots.memory import memory_png
from batchfit.plots.noise_scale import noise_scale_png, plot_noise_scale
from batchfit.plots.range_test import plot_range_test, range_test_png
from batchfit.plots.schedule import plot_schedule, schedule_png
from batchfit.plots.throughput import plot_throughput, throughput_png

__all__ = [
    "memory_png",
    "noise_scale_png",
    "plot_noise_scale",
    "plot_range_test",
    "plot_schedule",
    "plot_throughput",
    "range_test_png",
    "schedule_png",
    "throughput_png",
]
