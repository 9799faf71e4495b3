"""Learning rate: scaling with the batch, schedules, and the range test.

`scaling` applies the linear and square-root rules with warmup (`scale_lr`, `scaled_rate`);
`schedules` builds warmup-then-decay multipliers for `torch.optim.lr_scheduler`
(`ScheduleConfig`, `build_scheduler`); `range_test` sweeps the rate on a task
(`lr_range_test`), `suggest` holds its pure maths (smoothing, suggestions), and `result` its
answer (`RangeTestResult`).
"""
