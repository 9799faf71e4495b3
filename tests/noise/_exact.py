"""The exact B_simple of a model over a whole training set, from per-example gradients."""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap


def exact_noise_scale(model, loss, data, *, chunk: int = 256) -> tuple[float, float, float]:
    """(B_simple, |G|^2, tr(Sigma)) over every sample of `data` (Sigma divided by N).

    Per-example gradients with torch.func (functional_call + vmap(grad)), taken in chunks:
    G = mean_i g_i and tr(Sigma) = mean_i |g_i|^2 - |G|^2, the population values the
    estimators target (see batchfit.noise.estimator).
    """
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    params = {name: param.detach() for name, param in model.named_parameters()}
    buffers = {name: buffer.detach() for name, buffer in model.named_buffers()}

    def one_loss(trainable, inputs, targets):
        state = {**params, **trainable, **buffers}

        def forward(batch_inputs):
            return functional_call(model, state, (batch_inputs,))

        return loss(forward, (inputs.unsqueeze(0), targets.unsqueeze(0)))

    per_example = vmap(grad(one_loss), in_dims=(None, 0, 0))
    trainable = {name: params[name] for name in names}
    total = {name: torch.zeros_like(params[name], dtype=torch.float64) for name in names}
    sq_sum = torch.zeros((), dtype=torch.float64)
    count = len(data)
    inputs, targets = data.tensors if hasattr(data, "tensors") else _stack(data)
    was_training = model.training
    model.eval()  # no dropout; the built-in examples used here have no batch norm
    try:
        for start in range(0, count, chunk):
            grads = per_example(
                trainable, inputs[start : start + chunk], targets[start : start + chunk]
            )
            for name in names:
                part = grads[name].double()
                total[name] += part.sum(0)
                sq_sum += part.flatten(1).square().sum()
    finally:
        model.train(was_training)
    gradient_sq = float(sum((value / count).square().sum() for value in total.values()))
    trace = float(sq_sum / count) - gradient_sq
    return trace / gradient_sq, gradient_sq, trace


def _stack(data):
    items = [data[index] for index in range(len(data))]
    return torch.stack([item[0] for item in items]), torch.stack([item[1] for item in items])
