"""batchfit: what batch size, what learning rate, and how to get there on your hardware.

Public names are imported lazily, so `import batchfit` (and `batchfit --help`) does not import
torch until a name that needs it is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Plan": "batchfit.plan",
    "load_plan": "batchfit.plan",
    "write_report": "batchfit.report",
    "batchnorm_advice": "batchfit.norm_layers",
    "convert_batchnorm": "batchfit.norm_layers",
    "BatchfitError": "batchfit.errors",
    "ConfigError": "batchfit.errors",
    "TaskError": "batchfit.errors",
    "DoesNotFitError": "batchfit.errors",
    "CheckpointError": "batchfit.errors",
    "Task": "batchfit.task",
    "load_task": "batchfit.task",
    "load_example": "batchfit.task",
    "parse_size": "batchfit.units",
    "format_bytes": "batchfit.units",
    "max_batch_size": "batchfit.memory_model",
    "fit_memory_model": "batchfit.memory_model",
    "MemoryModel": "batchfit.memory_model",
    "round_down": "batchfit.rounding",
    "find_max_batch_size": "batchfit.search",
    "SearchResult": "batchfit.search",
    "measure_step_memory": "batchfit.memory",
    "count_memory": "batchfit.memory",
    "is_out_of_memory": "batchfit.memory",
    "predict_step_memory": "batchfit.predict",
    "resolve_device": "batchfit.devices",
    "AccumulationPlan": "batchfit.accumulation",
    "plan_accumulation": "batchfit.accumulation",
    "micro_batch_weights": "batchfit.accumulation",
    "accumulate_gradients": "batchfit.accumulation",
    "split_batch": "batchfit.accumulation",
    "ScaledRate": "batchfit.lr_scaling",
    "scale_lr": "batchfit.lr_scaling",
    "scaled_rate": "batchfit.lr_scaling",
    "default_rule": "batchfit.lr_scaling",
    "needs_warmup": "batchfit.lr_scaling",
    "default_warmup_steps": "batchfit.lr_scaling",
    "recommended_schedule": "batchfit.lr_scaling",
    "ScheduleConfig": "batchfit.schedules",
    "lr_multiplier": "batchfit.schedules",
    "build_scheduler": "batchfit.schedules",
    "schedule_table": "batchfit.schedules",
    "render_schedule": "batchfit.schedules",
    "plot_schedule": "batchfit.plots",
    "NoiseScaleResult": "batchfit.noise_scale",
    "NoiseScaleTracker": "batchfit.noise_scale",
    "measure_noise_scale": "batchfit.noise_measure",
    "estimate_gradient_statistics": "batchfit.noise_scale",
    "GradientNormWatch": "batchfit.gradient_norms",
    "NoiseScaleCallback": "batchfit.gradient_norms",
    "plot_noise_scale": "batchfit.plots",
    "lr_range_test": "batchfit.range_test",
    "RangeTestResult": "batchfit.range_test",
    "plot_range_test": "batchfit.plots",
    "measure_throughput": "batchfit.throughput",
    "find_knee": "batchfit.throughput",
    "ThroughputResult": "batchfit.throughput",
    "ThroughputMeter": "batchfit.throughput",
    "plot_throughput": "batchfit.plots",
    "train": "batchfit.loop",
    "TrainConfig": "batchfit.train_config",
    "TrainResult": "batchfit.loop",
    "run_with_backoff": "batchfit.backoff",
    "BackoffEvent": "batchfit.backoff",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'batchfit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
