"""Memory: how much one training step needs, and the largest batch that fits.

Data flow: `counter` counts live tensor storage exactly (any device, with a budget that raises
out-of-memory); `step` measures real steps and recognises out-of-memory errors; `predict` runs
steps under fake tensors (no real compute), with `fake_kernels` correcting a kernel whose fake
output is smaller than the real one (the LSTM workspace); `model` fits fixed + per-sample
bytes; `rounding` rounds a batch to a size hardware likes; `samples` picks a measured batch's
samples (the longest when batches are padded to their longest); `search` (with a Task) and
`probe` (with a plain `step(batch_size)` callable) find the limit, sharing `search_state`;
`result` is their answer; `runnable` caps a predicted answer at what this machine can run (for
measurements that run real steps here).

Public names: `count_memory`, `measure_step_memory`, `is_out_of_memory`, `predict_step_memory`,
`MemoryModel`, `fit_memory_model`, `max_batch_size`, `round_down`, `find_max_batch_size`,
`SearchResult`, `runnable_batch_size` (all importable from `batchfit`).
"""
