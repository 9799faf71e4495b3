"""Watching a run: read any run's curves, name what is wrong, say what to change.

`history` holds a run's series (`History`, `Series`); `readers` reads them from batchfit's
metrics.jsonl, Lightning's CSVLogger metrics.csv, Hugging Face Trainer's trainer_state.json and
TensorBoard event files (`read_history`), found in a run folder by `log_files` (`locate`),
through `log_records` (records into a `History`, the
series found by the names in `series_names`); `findings` is the fixed vocabulary, the thresholds
and the result (`Finding`, `Diagnosis`, `KINDS`); `diagnose` reads the curves (`diagnose`) with
the checks in `curve`, `divergence`, `checks` and `not_learning`; `advice` turns a finding into
new settings by the library's own rules; `live` runs the diagnosis during
`batchfit.training.loop.train` (`LiveDiagnosis`).
"""
