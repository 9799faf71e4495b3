"""A batch schedule under 2-process DDP on the CPU (gloo): same changes on both ranks, exact
samples, and a run stopped after a change resumes bit-identical to one that was not."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from batchfit.training.checkpoint import load_checkpoint
from batchfit.training.launcher import free_port
from batchfit.training.sampling import stream_indices
from tests.conftest import make_mlp_task

ROOT = Path(__file__).resolve().parents[2]
CONFTEST = ROOT / "tests" / "conftest.py"
# 32 per step until 96 samples, 64 until 224, then 128: changes at steps 4 and 6 of 6.
SPEC = "ramp:0:32,96:64,224:128"
FLAGS = dict(global_batch=32, micro_batch=16, steps=6, lr=0.1, warmup=0, batch_schedule=SPEC)

# Each rank: train to step 4 and stop (a clean stop after the first change: a checkpoint is
# written), then resume to step 6; record its batches, samples and changes for the test.
SCRIPT = """
import gc, json, sys
import torch.distributed as dist
sys.path.insert(0, {root!r})
from batchfit.training.callbacks import StopTraining
from batchfit.training.config import TrainConfig
from batchfit.training.loop import train
from tests.conftest import make_mlp_task

class Record:
    def __init__(self, stop_at=None):
        self.steps, self.stop_at = [], stop_at
    def on_step_end(self, record, model):
        self.steps.append([record.step, sum(record.micro_batches), list(record.indices)])
        if record.step == self.stop_at:
            raise StopTraining("cut after the first change")

dist.init_process_group("gloo")
flags, out = json.loads(sys.argv[1]), sys.argv[2]
cut, resumed = Record(stop_at=4), Record()
first = train(make_mlp_task(), TrainConfig(out_dir=out, **flags), device="cpu", callbacks=[cut])
second = train(make_mlp_task(), TrainConfig(out_dir=out, resume=True, **flags), device="cpu",
               callbacks=[resumed])
report = dict(first_steps=first.steps, stop=first.stop_reason, second_steps=second.steps,
              resumed_from=second.resumed_from_step, records=cut.steps + resumed.steps,
              changes=[c.to_dict() for c in second.batch_changes])
with open(f"{{out}}/rank{{dist.get_rank()}}.json", "w") as handle:
    json.dump(report, handle)
del first, second
gc.collect()  # free DDP's reducer before the group (see tests/training/test_accumulation.py)
dist.barrier()  # both ranks done before the group goes: rank 1 once aborted in its teardown
dist.destroy_process_group()
"""


def _run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.integration
def test_two_ranks_change_together_and_resume_bit_identical(tmp_path):
    full = tmp_path / "full"
    cli = [f"--{name.replace('_', '-')}={value}" for name, value in FLAGS.items()]
    done = _run(
        [sys.executable, "-m", "batchfit", "train", f"{CONFTEST}:make_mlp_task", *cli,
         "--out", str(full), "--device", "cpu", "--nproc", "2", "--no-noise-scale", "--json"]
    )  # fmt: skip
    printed = json.loads(done.stdout[done.stdout.index("{") :])
    assert printed["world_size"] == 2 and printed["samples_seen"] == 3 * 32 + 2 * 64 + 128

    script = tmp_path / "cut_and_resume.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    cut = tmp_path / "cut"
    cut.mkdir()
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script),
         json.dumps(FLAGS), str(cut)]
    )  # fmt: skip
    ranks = [json.loads((cut / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in ranks:
        assert (report["first_steps"], report["resumed_from"], report["second_steps"]) == (4, 4, 6)
        assert report["stop"] == "cut after the first change"
    # Both ranks changed the batch at the same steps, and the record says so on each.
    assert ranks[0]["changes"] == ranks[1]["changes"] == printed["batch_changes"]
    assert [(c["step"], c["new_batch"]) for c in printed["batch_changes"]] == [(4, 64), (6, 128)]
    per_rank = [[(step, size) for step, size, _ in report["records"]] for report in ranks]
    assert per_rank[0] == per_rank[1] == [(1, 16), (2, 16), (3, 16), (4, 32), (5, 32), (6, 64)]
    # Samples are exact: rank 0's share then rank 1's is the step's slice of the one stream.
    stream = [i for a, b in zip(ranks[0]["records"], ranks[1]["records"]) for i in a[2] + b[2]]
    task = make_mlp_task()
    assert stream == stream_indices(0, 352, dataset_size=len(task.train_data), seed=task.seed)
    assert sorted(stream[:256]) == list(range(256))  # the first epoch: each sample once
    # Stopped after the change and resumed: bit-identical to the uninterrupted 2-rank run.
    saved, resumed = load_checkpoint(full)["model"], load_checkpoint(cut)["model"]
    assert saved.keys() == resumed.keys()
    for name, value in saved.items():
        assert torch.equal(value, resumed[name]), name
