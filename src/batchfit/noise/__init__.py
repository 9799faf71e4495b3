"""Gradient noise: the critical batch size beyond which a bigger batch stops saving steps.

`estimator` holds the unbiased |G|^2 and tr(Sigma) estimates (McCandlish et al. 2018) and the
`NoiseScaleTracker` that smooths them; `watch` takes the micro-batch and rank gradient norms
during training (`GradientNormWatch`), and `run_advice` says whether a run can log them and
what the last value says of its batch; `callback` feeds it from the training loop
(`NoiseScaleCallback`); `pre_clip` keeps the accumulated gradient's norm before a loop
clips it (`AccumulatedGradNorm`); `measure` runs the standalone
measurement on a task (`measure_noise_scale`); `result` is the answer and its wording
(`NoiseScaleResult`).
"""
