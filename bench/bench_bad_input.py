"""Drive every `batchfit` subcommand with bad command lines and count how each ends.

Outcomes: "clean" (exit 2, the last stderr line `batchfit: error: ...`, one error line, no
traceback), "traceback" (a Python traceback on stderr), "accepted" (exit 0: the bad input was
silently used), "hang" (no exit within --timeout seconds) and "other" (any other exit).
Each command runs in a fresh process in a scratch folder that holds a finished run, a damaged
copy of it, plans for the wrong task and files that cannot be read.

Run by hand (about 2 minutes on 2 CPU cores):

    python bench/bench_bad_input.py
    python bench/bench_bad_input.py --timeout 60 --show clean
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFTEST = REPO / "tests" / "conftest.py"
MLP = f"{CONFTEST}:make_mlp_task"
BN1D = f"{CONFTEST}:make_bn1d_task"
TRAIN = ["--global-batch", "32", "--micro-batch", "16", "--steps", "2", "--device", "cpu"]
D = ["--example", "digits"]


def _scratch(folder: Path) -> None:
    """The files the bad commands point at."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    run = folder / "run"
    subprocess.run(
        [sys.executable, "-m", "batchfit", "train", MLP, *TRAIN, "--out", str(run)],
        check=True, capture_output=True, env=env, cwd=REPO,
    )  # fmt: skip
    for name, damage in {
        "flipped": lambda p: p.write_bytes(_flip(p.read_bytes())),
        "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        "text": lambda p: p.write_text("not a checkpoint"),
    }.items():
        shutil.copytree(run, folder / name)
        damage(folder / name / "checkpoint.pt")
    shutil.copytree(run, folder / "metrics")
    metrics = folder / "metrics" / "metrics.jsonl"
    metrics.write_text(metrics.read_text().replace("\n", "\n{not json\n", 1))
    shutil.copytree(run, folder / "nocheckpoint")
    (folder / "nocheckpoint" / "checkpoint.pt").unlink()
    code = (
        "import sys; sys.path.insert(0, {!r})\n"
        "from batchfit.plan.plan_file import Plan, model_identity\n"
        "from tests.conftest import make_mlp\n"
        "Plan(task='mlp', device='cpu', world_size=1, global_batch=32, micro_batch=16,\n"
        "     accumulation_steps=2, lr=0.1, lr_rule='linear', warmup_steps=0, total_steps=2,\n"
        "     task_name='tiny-mlp', **model_identity(make_mlp())).save({!r})\n"
    ).format(str(REPO), str(folder / "plan.json"))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)
    (folder / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (folder / "bad.json").write_text("{not json")
    (folder / "a_file").write_text("x")
    (folder / "full").mkdir()
    (folder / "full" / "old.txt").write_text("x")
    for name, text in {
        "raises.py": "x = 1 / 0\n",
        "syntax.py": "def task(:\n",
        "imports.py": "import no_such_module_here\n",
        "arguments.py": "def task(data):\n    return None\n",
        "not_a_task.py": "def task():\n    return 42\n",
    }.items():
        (folder / name).write_text(text)


def _flip(data: bytes) -> bytes:
    data = bytearray(data)
    data[len(data) // 2] ^= 0x01
    return bytes(data)


def commands(f: Path) -> list[list[str]]:
    """The bad command lines, by subcommand."""
    lines = []
    for sub in ("memory", "noise-scale", "lr-range", "throughput", "plan"):
        for task in ("raises.py", "syntax.py", "imports.py", "arguments.py", "not_a_task.py",
                     "missing.py"):  # fmt: skip
            lines.append([sub, f"{f / task}:task"])
        lines += [[sub, *D, "--memory-budget", "1e999999999GB"], [sub, *D, "--device", "tpu"]]
    lines += [
        ["estimate", "--memory", "-1GB", "--model", "1GB", "--per-sample", "1MB"],
        ["estimate", "--memory", "24GB", "--model", "30GB", "--per-sample", "1MB"],
        ["estimate", "--memory", "24GB", "--model", "1GB", "--per-sample", "0"],
        ["estimate", "--memory", "24GB", "--model", "1GB", "--per-sample", "1MB", "--round", "x"],
        ["memory", *D, "--margin", "1"],
        ["memory", *D, "--max-batch", "0"],
        ["memory", *D, "--gpu", "no-such-card"],
        ["memory", *D, "--round", "-8"],
        ["noise-scale", *D, "--checkpoint", str(f / "text" / "checkpoint.pt")],
        ["noise-scale", *D, "--checkpoint", str(f / "truncated" / "checkpoint.pt")],
        ["noise-scale", *D, "--checkpoint", str(f / "missing.pt")],
        ["noise-scale", *D, "--checkpoint", str(f / "run" / "checkpoint.pt")],
        ["noise-scale", *D, "--small-batch", "64", "--big-batch", "8"],
        ["noise-scale", *D, "--plot", str(f / "a_file" / "x.png")],
        ["scale-lr", "--lr", "nan", "--batch", "8", "--new-batch", "16"],
        ["scale-lr", "--lr", "0.1", "--batch", "8", "--new-batch", "16", "--rule", "cube"],
        ["scale-lr", "--lr", "0.1", "--batch", "8", "--new-batch", "99999999999999999999999"],
        ["scale-lr", "--lr", "0.1", "--batch", "8", "--new-batch", "16", "--plot", "x.png"],
        ["lr-range", *D, "--start-lr", "1", "--end-lr", "0.1"],
        ["lr-range", *D, "--steps", "3"],
        ["lr-range", *D, "--plot", str(f)],
        ["lr-range", *D, "--global-batch", "10", "--micro-batch", "3"],
        ["throughput", *D, "--batch-sizes", "0,8"],
        ["throughput", *D, "--batch-sizes", "8,8"],
        ["throughput", BN1D, "--batch-sizes", "1"],
        ["throughput", *D, "--batch-sizes", "99999999"],
        ["plan", *D, "--margin", "1.5"],
        ["plan", *D, "--margin", "nan"],
        ["plan", *D, "--world-size", "0"],
        ["plan", *D, "--out", str(f / "a_file")],
        ["plan", *D, "--out", str(f / "full")],
        ["plan", *D, "--target-global-batch", "99999999"],
        ["train", *D],
        ["train", *D, "--global-batch", "8"],
        ["train", *D, "--global-batch", "99999999999999999999999"],
        ["train", *D, "--global-batch", "100000000000000"],
        ["train", *D, *TRAIN[:4], "--seed", str(2**64)],
        ["train", *D, "--lr", "1e300"],
        ["train", *D, *TRAIN[:4], "--swa-start", "0"],
        ["train", *D, "--global-batch", "8", "--micro-batch", "16"],
        ["train", *D, *TRAIN[:4], "--decay", "exp"],
        ["train", *D, *TRAIN[:4], "--optimizer", "rmsprop"],
        ["train", *D, *TRAIN[:4], "--warmup", "101%"],
        ["train", *D, *TRAIN, "--out", str(f / "a_file")],
        ["train", *D, *TRAIN, "--out", str(f / "full")],
        ["train", *D, *TRAIN, "--nproc", "0"],
        ["train", *D, *TRAIN, "--ddp-timeout", "0"],
        ["train", *D, "--plan", str(f / "missing.json")],
        ["train", *D, "--plan", str(f / "bad.json")],
        ["train", *D, "--plan", str(f / "deep.json")],
        ["train", *D, "--plan", str(f / "plan.json"), "--out", str(f / "x1")],
        ["train", "--plan", str(f / "missing.json")],  # no task: the plan's would be used
        ["train", "--plan", str(f / "plan.json"), "--out", str(f / "x2")],  # task 'mlp'?
        ["train", MLP, *TRAIN, "--resume", str(f / "flipped")],
        ["train", MLP, *TRAIN, "--resume", str(f / "truncated")],
        ["train", MLP, *TRAIN, "--resume", str(f / "text")],
        ["train", MLP, *TRAIN, "--resume", str(f / "metrics")],
        ["train", f"{CONFTEST}:make_regression_task", *TRAIN, "--resume", str(f / "run")],
        ["train", MLP, *TRAIN, "--memory-budget", "1KB", "--out", str(f / "x2")],
        ["train", MLP, *TRAIN, "--resume", str(f / "missing")],
        ["diagnose", str(f / "missing")],
        ["diagnose", str(f / "a_file")],
        ["diagnose", str(f / "run"), "--train-loss", "nope"],
        ["diagnose", str(f / "run"), "--plot", str(f / "a_file" / "x.png")],
        ["sweep", *D, "--target", "accuracy>>1"],
        ["sweep", *D, "--target", "val_loss<=0.1", "--batch-sizes", "0"],
        ["frobnicate"],
        ["memory", "--exampel", "digits"],
        ["memory"],
    ]
    return lines


def classify(argv: list[str], timeout: float, cwd: Path) -> tuple[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "batchfit", *argv],
            capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "hang", ""
    err = done.stderr.strip()
    last = err.splitlines()[-1] if err else ""
    if "Traceback (most recent call last)" in err:
        return "traceback", last
    errors = [line for line in err.splitlines() if line.startswith("batchfit: error:")]
    if done.returncode == 2 and last.startswith("batchfit: error:") and len(errors) == 1:
        return "clean", last
    if done.returncode == 0:
        return "accepted", (done.stdout.strip().splitlines() or [""])[-1]
    return "other", f"exit {done.returncode}: {last}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=120, help="seconds before a hang")
    parser.add_argument("--show", default="traceback,accepted,hang,other",
                        help="outcomes whose command lines are printed")  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        _scratch(folder)
        counts: collections.Counter[str] = collections.Counter()
        by_command: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        lines = commands(folder)
        for argv in lines:
            outcome, last = classify(argv, args.timeout, folder)
            counts[outcome] += 1
            by_command[argv[0]][outcome] += 1
            if outcome in args.show.split(","):
                shown = " ".join(argv).replace(str(folder), "$SCRATCH")
                print(f"{outcome:9} batchfit {shown}\n          {last[:160]}")
    outcomes = ("clean", "traceback", "accepted", "hang", "other")
    print(f"\n{len(lines)} bad command lines")
    print(f"{'command':12}" + "".join(f"{name:>10}" for name in outcomes))
    for command in sorted(by_command):
        print(f"{command:12}" + "".join(f"{by_command[command][n]:>10}" for n in outcomes))
    print(f"{'all':12}" + "".join(f"{counts[n]:>10}" for n in outcomes))


if __name__ == "__main__":
    main()
