"""The plan: micro-batch, accumulation, global batch, rate, warmup and optimizer, with reasons.

`planner` measures a task and decides (`plan`); `noise_for_run` measures the noise scale at two
points of a warm-up and extrapolates it to the run; `advice` holds the rules as pure functions
of measured numbers; `plan_file` is the `Plan` and its versioned plan.json (`load_plan`);
`norm_layers` finds BatchNorm and advises on it (`batchnorm_advice`, `convert_batchnorm`).
"""
