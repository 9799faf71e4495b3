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
    "Plan": "batchfit.plan.plan_file",
    "load_plan": "batchfit.plan.plan_file",
    "write_report": "batchfit.report.html",
    "batchnorm_advice": "batchfit.plan.norm_layers",
    "convert_batchnorm": "batchfit.plan.norm_layers",
    "BatchfitError": "batchfit.errors",
    "ConfigError": "batchfit.errors",
    "TaskError": "batchfit.errors",
    "DoesNotFitError": "batchfit.errors",
    "CheckpointError": "batchfit.errors",
    "TrainingDivergedError": "batchfit.errors",
    "DistributedError": "batchfit.errors",
    "Task": "batchfit.task",
    "load_task": "batchfit.task",
    "load_example": "batchfit.task",
    "parse_size": "batchfit.units",
    "format_bytes": "batchfit.units",
    "max_batch_size": "batchfit.memory.model",
    "fit_memory_model": "batchfit.memory.model",
    "MemoryModel": "batchfit.memory.model",
    "round_down": "batchfit.memory.rounding",
    "find_max_batch_size": "batchfit.memory.search",
    "runnable_batch_size": "batchfit.memory.runnable",
    "SearchResult": "batchfit.memory.result",
    "measure_step_memory": "batchfit.memory.step",
    "count_memory": "batchfit.memory.counter",
    "is_out_of_memory": "batchfit.memory.step",
    "predict_step_memory": "batchfit.memory.predict",
    "resolve_device": "batchfit.devices",
    "AccumulationPlan": "batchfit.training.accumulation",
    "plan_accumulation": "batchfit.training.accumulation",
    "micro_batch_weights": "batchfit.training.accumulation",
    "accumulate_gradients": "batchfit.training.accumulation",
    "split_batch": "batchfit.training.accumulation",
    "ScaledRate": "batchfit.lr.scaling",
    "scale_lr": "batchfit.lr.scaling",
    "scaled_rate": "batchfit.lr.scaling",
    "default_rule": "batchfit.lr.scaling",
    "needs_warmup": "batchfit.lr.scaling",
    "default_warmup_steps": "batchfit.lr.scaling",
    "recommended_schedule": "batchfit.lr.scaling",
    "ScheduleConfig": "batchfit.lr.schedules",
    "lr_multiplier": "batchfit.lr.schedules",
    "build_scheduler": "batchfit.lr.schedules",
    "schedule_table": "batchfit.lr.schedules",
    "render_schedule": "batchfit.lr.schedules",
    "plot_schedule": "batchfit.plots.schedule",
    "NoiseScaleResult": "batchfit.noise.result",
    "NoiseScaleTracker": "batchfit.noise.estimator",
    "measure_noise_scale": "batchfit.noise.measure",
    "estimate_gradient_statistics": "batchfit.noise.estimator",
    "GradientNormWatch": "batchfit.noise.watch",
    "NoiseScaleCallback": "batchfit.noise.callback",
    "plot_noise_scale": "batchfit.plots.noise_scale",
    "lr_range_test": "batchfit.lr.range_test",
    "RangeTestResult": "batchfit.lr.result",
    "RangeTestInterrupted": "batchfit.lr.result",
    "plot_range_test": "batchfit.plots.range_test",
    "measure_throughput": "batchfit.throughput.measure",
    "find_knee": "batchfit.throughput.result",
    "ThroughputResult": "batchfit.throughput.result",
    "ThroughputMeter": "batchfit.throughput.meter",
    "plot_throughput": "batchfit.plots.throughput",
    "train": "batchfit.training.loop",
    "TrainConfig": "batchfit.training.config",
    "TrainResult": "batchfit.training.loop",
    "StopTraining": "batchfit.training.callbacks",
    "BatchSchedule": "batchfit.training.batch_schedule",
    "parse_batch_schedule": "batchfit.training.batch_schedule",
    "run_with_backoff": "batchfit.training.backoff",
    "BackoffEvent": "batchfit.training.backoff",
    "RunLogError": "batchfit.errors",
    "History": "batchfit.monitor.history",
    "read_history": "batchfit.monitor.readers",
    "diagnose": "batchfit.monitor.diagnose",
    "Diagnosis": "batchfit.monitor.findings",
    "Finding": "batchfit.monitor.findings",
    "LiveDiagnosis": "batchfit.monitor.live",
    "plot_diagnosis": "batchfit.plots.diagnosis",
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
