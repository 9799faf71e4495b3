"""Training throughput: samples (and tokens) per second against batch size, and its knee.

A bigger batch keeps the hardware busier, up to a point: past the knee, doubling the batch
barely raises samples per second, and only costs memory and (past the critical batch)
optimizer steps.

- `measure`: `measure_throughput` times full training steps at each batch size, in
  interleaved rounds;
- `timing`: the rules that keep those times steady under load (a low quantile, the spread,
  the timing thread's CPU time where the wall clock is distorted);
- `sizes`: which batch sizes to measure, and the limit (data, memory, `max_batch_size`);
- `result`: `ThroughputResult` and `find_knee`;
- `meter`: `ThroughputMeter`, samples per second over the last steps of a training run.
"""
