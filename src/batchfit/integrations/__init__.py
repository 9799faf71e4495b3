"""Integrations: batchfit inside the trainers people already use, each behind an optional extra.

- `batchfit.integrations.lightning`: `BatchFit`, a Lightning callback (plan, search, noise
  scale, out-of-memory back-off).
- `batchfit.integrations.lightning_task`: `task_from_lightning` behind `Task.from_lightning`.
- `batchfit.integrations.lightning_fit`: the callback's batch schedule (at epoch starts), its
  end-of-fit diagnosis (`diagnose_fit`) and the module's data for the search.
- `batchfit.integrations.lightning_split`: `split_training_step`, the callback's out-of-memory
  back-off (a batch run in parts with the whole batch's gradient).
- `batchfit.integrations.lightning_noise`: `watch_step`, the callback's noise scale of a step.
- `batchfit.integrations.diagnosis`: `RunRecords` and `write_run_diagnosis`, the diagnosis.json
  both the Lightning and the Hugging Face callbacks write at the end of a run.
- `batchfit.integrations.transformers`: `apply_plan` for `TrainingArguments`,
  `NoiseScaleTrainerCallback`, and `task_from_transformers` behind `Task.from_transformers`.
- `batchfit.integrations.accelerate`: `find_executable_batch_size`, which keeps the global batch
  by raising accumulation, and the recipe for `accelerator.accumulate` with the noise-scale watch.
- `batchfit.integrations.optional`: `require`, the one import of an optional dependency.
"""
