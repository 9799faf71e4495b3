"""LR range test: batchfit against torch-lr-finder and Lightning's Tuner.lr_find.

Same task (a built-in example), same model initialisation, same optimizer, same batch size,
same sweep (exponential, START_LR to END_LR over STEPS steps) and the same divergence factor.
Reports for each tool: the suggested rate(s), the wall time, the steps it ran, and whether the
model's weights, the optimizer's state and torch's random generator were left as they were.
As a check of the suggestions, "val metric" is the task's validation metric (accuracy) after
--train-steps steps at the suggested rate, from the same initialisation and batches.

Run by hand (needs the bench extra: lightning, torch-lr-finder):

    python bench/bench_range_test.py --examples digits,cnn,charlm --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import os
import statistics
import tempfile
import time
import warnings

import torch
from torch.utils.data import DataLoader

from batchfit.lr.range_test import lr_range_test
from batchfit.task import load_example


def _state_equal(model, optimizer, saved) -> tuple[bool, bool]:
    weights = all(
        torch.equal(saved["model"][name], value) for name, value in model.state_dict().items()
    )
    before, after = saved["optimizer"], optimizer.state_dict()
    same = before["param_groups"] == after["param_groups"]
    same = same and before["state"].keys() == after["state"].keys()
    for key, state in before["state"].items():
        for name, value in state.items():
            other = after["state"].get(key, {}).get(name)
            if torch.is_tensor(value):
                same = same and other is not None and torch.equal(value, other)
            else:
                same = same and value == other
    return weights, same


def _outcome(suggestion, begun, steps_run, model, optimizer, saved, rng, **extra) -> dict:
    """One tool's row: its suggestion, time, steps, and whether it left everything unchanged."""
    seconds = time.perf_counter() - begun
    weights, opt = _state_equal(model, optimizer, saved)
    return {
        "suggestion": suggestion,
        "other": "",
        **extra,
        "seconds": seconds,
        "steps_run": steps_run,
        "weights": weights,
        "optimizer": opt,
        "rng": torch.equal(rng, torch.get_rng_state()),
    }


def _setup(task, seed: int = 0):
    """Model, optimizer (with state: a few steps taken), loader, and a saved copy of all."""
    torch.manual_seed(seed)
    model = task.make_model()
    optimizer = task.make_optimizer(model.parameters())
    # No generator of its own: the loader shuffles with torch's global generator, as most do.
    loader = DataLoader(
        task.train_data,
        batch_size=task.batch_size,
        shuffle=True,
        collate_fn=task.collate_fn(),
        drop_last=True,
    )
    batches = iter(loader)
    for _ in range(3):  # give the optimizer some state, as in the middle of a training run
        optimizer.zero_grad()
        task.loss(model, next(batches)).backward()
        optimizer.step()
    saved = {
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
    }
    return model, optimizer, loader, saved


def run_batchfit(task, args):
    model, optimizer, loader, saved = _setup(task)
    rng = torch.get_rng_state()
    begun = time.perf_counter()
    result = lr_range_test(
        model,
        optimizer,
        loss=task.loss,
        train_data=loader,
        start_lr=args.start_lr,
        end_lr=args.end_lr,
        steps=args.steps,
        diverge_factor=args.diverge_factor,
    )
    return _outcome(
        result.steepest_lr,
        begun,
        result.steps_run,
        model,
        optimizer,
        saved,
        rng,
        valley=result.valley_lr,
    )


class _Criterion(torch.nn.Module):
    """torch-lr-finder calls criterion(model(inputs), labels): adapt the task's loss."""

    def __init__(self, task):
        super().__init__()
        self.task = task

    def forward(self, outputs, labels):
        return torch.nn.functional.cross_entropy(
            outputs.reshape(-1, outputs.shape[-1]), labels.reshape(-1)
        )


def run_torch_lr_finder(task, args):
    from matplotlib.figure import Figure
    from torch_lr_finder import LRFinder

    model, optimizer, loader, saved = _setup(task)
    rng = torch.get_rng_state()
    begun = time.perf_counter()
    finder = LRFinder(model, optimizer, _Criterion(task), device="cpu")
    finder.range_test(
        loader,
        start_lr=args.start_lr,
        end_lr=args.end_lr,
        num_iter=args.steps,
        step_mode="exp",
        smooth_f=0.05,
        diverge_th=args.diverge_factor,
    )
    axes = Figure().add_subplot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, suggestion = finder.plot(ax=axes, suggest_lr=True)
    finder.reset()
    return _outcome(suggestion, begun, len(finder.history["lr"]), model, optimizer, saved, rng)


def run_lightning(task, args, tmp_dir):
    import lightning.pytorch as pl
    from lightning.pytorch.tuner import Tuner

    model, optimizer, loader, saved = _setup(task)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model
            self.lr = args.start_lr

        def training_step(self, batch, batch_index):
            return task.loss(self.net, batch)

        def configure_optimizers(self):
            return optimizer

    module = Module()
    rng = torch.get_rng_state()
    begun = time.perf_counter()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1000,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_dir,
    )
    finder = Tuner(trainer).lr_find(
        module,
        train_dataloaders=loader,
        min_lr=args.start_lr,
        max_lr=args.end_lr,
        num_training=args.steps,
        mode="exponential",
        early_stop_threshold=args.diverge_factor,
        update_attr=False,
    )
    suggestion = finder.suggestion()
    return _outcome(suggestion, begun, len(finder.results["lr"]), model, optimizer, saved, rng)


def train_quality(task, lr: float, steps: int) -> float:
    """Validation metric after `steps` steps at a constant `lr` from the benchmark's start."""
    torch.manual_seed(0)
    model = task.make_model()
    optimizer = task.make_optimizer(model.parameters(), lr)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        indices = torch.randint(len(task.train_data), (task.batch_size,), generator=generator)
        optimizer.zero_grad()
        task.loss(model, task.batch(indices.tolist())).backward()
        optimizer.step()
    model.eval()
    batch = task.batch(range(len(task.val_data)), data=task.val_data)
    return float(task.metric(model, batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", default="digits,cnn,charlm", help="comma-separated")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--start-lr", type=float, default=1e-6)
    parser.add_argument("--end-lr", type=float, default=1.0)
    parser.add_argument("--diverge-factor", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--train-steps", type=int, default=200, help="steps of the check run at each suggestion"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    optimizer_name = {}
    print(
        f"{args.steps} steps, {args.start_lr:g} to {args.end_lr:g}, diverge factor "
        f"{args.diverge_factor:g}, median of {args.repeats} runs, torch threads {args.threads}, "
        f"cpu count {os.cpu_count()}\n"
    )
    print(
        "| task | tool | suggested lr | val metric | other | median time (s) | steps run | "
        "weights same | optimizer same | torch RNG same |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for example in args.examples.split(","):
            task = load_example(example)
            probe = task.make_optimizer([torch.nn.Parameter(torch.zeros(1))])
            optimizer_name[example] = type(probe).__name__
            label = f"{example} ({optimizer_name[example]}, batch {task.batch_size})"
            tools = {
                "batchfit": lambda: run_batchfit(task, args),  # noqa: B023
                "torch-lr-finder": lambda: run_torch_lr_finder(task, args),  # noqa: B023
                "Lightning lr_find": lambda: run_lightning(task, args, tmp),  # noqa: B023
            }
            runs: dict[str, list] = {name: [] for name in tools}
            for _ in range(args.repeats):  # interleaved, so load on the machine hits all alike
                for name, run in tools.items():
                    with (
                        contextlib.redirect_stdout(io.StringIO()),
                        contextlib.redirect_stderr(io.StringIO()),
                    ):  # the other tools print progress and tips
                        runs[name].append(run())
            for name, results in runs.items():
                first = results[0]
                seconds = statistics.median(r["seconds"] for r in results)
                yes = {True: "yes", False: "**no**"}
                quality = train_quality(task, first["suggestion"], args.train_steps)
                if first.get("valley"):
                    valley_quality = train_quality(task, first["valley"], args.train_steps)
                    first["other"] = f"valley {first['valley']:.3g} (val {valley_quality:.3f})"
                print(
                    f"| {label} | {name} | {first['suggestion']:.3g} | {quality:.3f} | "
                    f"{first['other']} | "
                    f"{seconds:.2f} | {first['steps_run']} | "
                    f"{yes[all(r['weights'] for r in results)]} | "
                    f"{yes[all(r['optimizer'] for r in results)]} | "
                    f"{yes[all(r['rng'] for r in results)]} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
