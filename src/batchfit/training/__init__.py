"""Training at any global batch: the reference loop and the pieces any loop can use.

`config` is the run's settings (`TrainConfig`); `loop` trains (`train`, `TrainResult`) over
named parts: `setup` (set-up and resume), `step` (one optimizer step, `StepRecord`), `callbacks`
(`TrainCallback`, `StopTraining`) and `progress` (the bar, Ctrl-C / SIGTERM);
`accumulation` splits a global batch into micro-batches exactly (`plan_accumulation`,
`split_batch`, `accumulate_gradients`; `micro_batch_checks` refuses sizes or one whole batch
given as its micro-batches); `backoff` halves the micro-batch on out-of-memory
(`run_with_backoff`); `sampling` fixes the data order; `checkpoint` and `metrics` write the run
folder; `evaluation`, `optimizers` and `distributed` (DDP through torchrun) complete it.
"""
