"""The measured critical batch: batch x rate grids, steps to a target, the fitted B_crit.

Shallue et al. (2019) measure it directly: for each batch size, re-tune the learning rate, count
the optimizer steps to reach a fixed target, and read off where doubling the batch stops halving
the steps. `batchfit.sweep.driver.run_sweep` does that end to end; the fit S = S_min + E_min/B
(McCandlish et al. 2018) gives B_crit = E_min / S_min.

Modules: `target` (parse "val_accuracy>=0.96"), `grid` (batch and rate grids), `trial` (one
training run to the target), `fit` (the S(B) fit and the best-rate exponent), `store` (finished
trials on disk, resume), `engines` (local processes or Ray), `result` (`SweepResult`), `driver`
(`run_sweep`, `SweepConfig`).
"""
