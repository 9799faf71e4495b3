"""Plain loops and Hugging Face Accelerate: keep the global batch when memory runs out.

`find_executable_batch_size` is Accelerate's decorator of the same name with one difference:
when the function runs out of memory it halves the micro-batch *and raises the accumulation*,
so the global batch (samples per optimizer step) stays what the learning rate was tuned for.
It needs only torch.

The recipe for `accelerator.accumulate` with the gradient-noise-scale watch (tested in
tests/integrations/test_accelerate.py):

    from accelerate import Accelerator
    from batchfit.noise.estimator import NoiseScaleTracker
    from batchfit.noise.watch import GradientNormWatch

    @find_executable_batch_size(global_batch=256)
    def run(micro_batch, accumulation_steps):
        accelerator = Accelerator(gradient_accumulation_steps=accumulation_steps)
        loader = DataLoader(data, batch_size=micro_batch, shuffle=True)
        model, optimizer, loader = accelerator.prepare(make_model(), make_optimizer(), loader)
        tracker = NoiseScaleTracker()
        with GradientNormWatch(model, tracker) as watch:
            for index, (inputs, labels) in enumerate(loader, start=1):
                with accelerator.accumulate(model):
                    loss = loss_fn(model(inputs), labels)
                    accelerator.backward(loss)    # divides the loss by accumulation_steps
                    watch.micro_batch(len(inputs), loss_scale=1 / accumulation_steps)
                    if accelerator.sync_gradients:
                        if index % accumulation_steps:  # an epoch's short last step
                            watch.reset()
                        else:
                            scaler = accelerator.scaler  # fp16: gradients carry its scale
                            watch.step(grad_scale=scaler.get_scale() if scaler else 1.0)
                        accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()              # Accelerate skips it between syncs
                    optimizer.zero_grad()
        return tracker.noise_scale

    noise_scale = run()

`watch.step` comes before clipping and `optimizer.step()`: it reads the accumulated gradient
before either changes it. An epoch whose loader batches are not a multiple of
`accumulation_steps` ends with a shorter step, whose losses Accelerate still divides by
`accumulation_steps`: its `.grad` is not the mean of its micro-batches, so it is not measured.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from batchfit import devices
from batchfit.errors import ConfigError, DoesNotFitError
from batchfit.memory.search_state import error_line
from batchfit.memory.step import is_out_of_memory
from batchfit.training.backoff import next_micro_batch
from batchfit.validation import check_whole_number

logger = logging.getLogger(__name__)

__all__ = ["find_executable_batch_size"]

Result = TypeVar("Result")


def find_executable_batch_size(
    function: Callable[..., Result] | None = None,
    *,
    global_batch: int | None = None,
    world_size: int = 1,
    starting_micro_batch: int | None = None,
    **unknown: Any,
) -> Any:
    """Call `function(micro_batch, accumulation_steps, ...)` until it fits in memory.

    The first call gets the largest micro-batch (`starting_micro_batch`, default the whole
    per-process share `global_batch / world_size`), a later call the one that fitted last; each
    out-of-memory error halves it (to the
    largest divisor of the share at most half the last one) and raises `accumulation_steps` so
    that `micro_batch x accumulation_steps x world_size == global_batch` always. Any other
    error is raised unchanged. The function should build its data loader from `micro_batch`
    and set up accumulation from `accumulation_steps` (e.g. `Accelerator(
    gradient_accumulation_steps=...)`), and start its work afresh on each call.

    Args:
        function: the function to wrap; leave it out to use this as `@decorator(...)`.
        global_batch: samples per optimizer step over all processes.
        world_size: processes sharing the global batch (`accelerator.num_processes`).
        starting_micro_batch: the first micro-batch to try; must divide the per-process share.

    Returns:
        The wrapped function, which takes the remaining arguments of `function` and returns its
        result. It records the micro-batch and accumulation that worked as
        `wrapped.micro_batch` and `wrapped.accumulation_steps`.

    Raises:
        ConfigError: global_batch is missing, a keyword is not one of this decorator's
            (Accelerate's `starting_batch_size`, say), the global batch is not a multiple
            of world_size, the starting micro-batch does not divide the share, or the wrapped
            function is called with arguments `function` does not take (the micro-batch,
            say, which the decorator passes).
        DoesNotFitError: even a micro-batch of 1 runs out of memory.

    Example:
        >>> @find_executable_batch_size(global_batch=64)
        ... def run(micro_batch, accumulation_steps):
        ...     if micro_batch > 16:
        ...         raise MemoryError("out of memory")
        ...     return micro_batch, accumulation_steps
        >>> run()
        (16, 4)
    """
    if unknown or global_batch is None:
        given = ", ".join(f"{name}={value!r}" for name, value in unknown.items())
        sizes = [value for value in unknown.values() if isinstance(value, int)]
        raise ConfigError(
            "find_executable_batch_size takes global_batch=, world_size= and "
            "starting_micro_batch=; "
            + (f"got {given}" if given else "global_batch is missing")
            + " (it keeps the global batch fixed, so name it: e.g. @find_executable_batch_size("
            f"global_batch={sizes[0] if sizes else 128}), the samples per optimizer step)."
        )
    global_batch = check_whole_number("global_batch", global_batch)
    world_size = check_whole_number("world_size", world_size)
    if global_batch % world_size:
        raise ConfigError(
            f"global_batch ({global_batch}) is not a multiple of world_size ({world_size}); "
            "choose a global batch that divides evenly between the processes."
        )
    share = global_batch // world_size
    start = share if starting_micro_batch is None else starting_micro_batch
    start = check_whole_number("starting_micro_batch", start)
    if share % start:
        raise ConfigError(
            f"starting_micro_batch ({start}) does not divide the per-process batch ({share}); "
            f"choose a divisor of {share}."
        )
    if function is None:
        return functools.partial(
            find_executable_batch_size,
            global_batch=global_batch,
            world_size=world_size,
            starting_micro_batch=start,
        )
    signature = inspect.signature(function)
    parameters = list(signature.parameters)
    if len(parameters) < 2:
        raise ConfigError(
            f"{function.__name__} must take (micro_batch, accumulation_steps, ...) as its first "
            "two arguments."
        )

    @functools.wraps(function)
    def wrapped(*args: Any, **kwargs: Any) -> Result:
        # a later call starts where the last one fitted, as Accelerate's decorator does
        micro = getattr(wrapped, "micro_batch", start)
        try:  # a wrong call, before any try: not an error of the function's to retry on
            signature.bind(micro, share // micro, *args, **kwargs)
        except TypeError as error:
            raise ConfigError(
                f"{function.__name__}() was called with arguments it does not take ({error}); "
                "the decorator passes micro_batch and accumulation_steps itself: call "
                f"{function.__name__}() with the other arguments only."
            ) from None
        while True:
            accumulation = share // micro
            try:
                result = function(micro, accumulation, *args, **kwargs)
            except Exception as error:  # only out-of-memory is retried; see below
                if not is_out_of_memory(error):
                    raise
                devices.release_memory(_accelerator_device())
                if micro == 1:
                    raise DoesNotFitError(
                        f"Even a micro-batch of 1 runs out of memory ({error_line(error)}); try "
                        "a smaller model, mixed precision or activation checkpointing."
                    ) from error
                smaller = next_micro_batch(micro, share)
                logger.warning(
                    "out of memory at micro-batch %d; retrying with %d x %d (global batch %d)",
                    micro,
                    smaller,
                    share // smaller,
                    global_batch,
                )
                micro = smaller
                continue
            wrapped.micro_batch = micro  # type: ignore[attr-defined]
            wrapped.accumulation_steps = accumulation  # type: ignore[attr-defined]
            return result

    return wrapped


def _accelerator_device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else None
