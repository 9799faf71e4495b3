"""The U-Net case: a tiny, fast variant end to end, the memory comparison, the claims' rules."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace

import pytest
import torch
from torch.utils.data import TensorDataset

from batchfit.errors import ConfigError
from batchfit.examples import unet
from batchfit.examples.case_unet import case_task, image_iou, run_unet_case
from batchfit.examples.case_unet_claims import judge_claims
from batchfit.examples.case_unet_result import ArmSummary


def tiny_task():
    """The case task on 64 scenes (48 to train) with a 4-channel U-Net: seconds per run."""
    images, masks = unet.make_scenes(64, seed=1)
    return dataclasses.replace(
        case_task(),
        model=lambda: unet.UNet(width=4),
        train_data=TensorDataset(images[:48], masks[:48]),
        val_data=TensorDataset(images[48:], masks[48:]),
    )


@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory):
    out = tmp_path_factory.mktemp("case")
    calls = []
    result = run_unet_case(
        out, seeds=1, epochs=2, task=tiny_task(), last_evaluations=2, eval_samples=16,
        progress=lambda *call: calls.append(call),
    )  # fmt: skip
    return out, result, calls


def test_tiny_case_runs_every_arm_and_writes_table_result_and_plots(tiny_case):
    out, result, calls = tiny_case
    assert [arm.arm for arm in result.arms] == ["b16", "b64-accum", "plan"]
    by_arm = {arm.arm: arm for arm in result.arms}
    assert (by_arm["b16"].global_batch, by_arm["b16"].micro_batch) == (16, 16)
    accumulated = by_arm["b64-accum"]
    assert (accumulated.global_batch, accumulated.accumulation_steps) == (64, 4)
    assert accumulated.lr == pytest.approx(4 * by_arm["b16"].lr)  # the linear rule
    assert accumulated.warmup_steps >= 1 and by_arm["b16"].warmup_steps == 0
    # The same samples for each arm: 2 epochs of 48 images, rounded up to whole steps.
    for run in result.runs:
        assert run.samples >= 96 and run.samples - run.global_batch < 96
        assert run.evaluations >= 2 and 0 <= run.last_iou_mean <= 1
        assert run.loss_spread is None or run.loss_spread >= 0
        assert (out / "runs" / f"{run.arm}-seed{run.seed}" / "metrics.jsonl").is_file()
        assert (out / "runs" / f"{run.arm}-seed{run.seed}" / "diagnosis.json").is_file()
    for name in ("case-unet-loss.png", "case-unet-iou.png", "case-unet-iou-last.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "case.json").read_text())
    assert saved["arms"][1]["global_batch"] == 64
    # the IoU column names the evaluations it averages: 2 asked for, never more than ran
    header, _ = result.arm_rows()
    assert header[4] == "IoU, last 2 evals (seed range)"
    fewer = replace(result, training={**result.training, "last_evaluations": 50})
    most = max(run.evaluations for run in result.runs)
    assert fewer.arm_rows()[0][4] == f"IoU, last {most} evals (seed range)"
    assert [c["claim"] for c in saved["claims"]][-1] == "accumulation calms the IoU"
    table = (out / "case.md").read_text()
    assert "| power of two chosen | 16 | 16 |" in table and "b64-accum" in table
    assert (
        json.loads((out / "plan.json").read_text())["global_batch"] == result.plan["global_batch"]
    )
    phases = {call[0] for call in calls}
    assert {"memory", "train"} <= phases and any(p.startswith("plan: ") for p in phases)
    assert calls[-1][1] == calls[-1][2]  # the train phase ends at its total


def test_memory_comparison_against_the_guide(tiny_case):
    memory = tiny_case[1].memory
    assert (memory.guide_limit_batch, memory.guide_batch) == (18, 16)  # (12 - 3) / 0.5
    assert memory.parameters == 31_036_481
    # fp32 Adam: weights, gradients and two moments, 16 bytes per parameter.
    assert memory.state_bytes >= 16 * memory.parameters
    assert memory.limit_batch < memory.formula_limit_batch  # the reserve and margin cost batches
    assert memory.batch == 16 and memory.peak_bytes_at_batch <= memory.usable_bytes
    assert "16 bytes per parameter" in memory.explanation()


def test_image_iou_is_the_mean_of_per_image_scores():
    class Logits(torch.nn.Module):
        def forward(self, images):
            return images

    images = torch.tensor([[[[1.0, 1.0]]], [[[-1.0, -1.0]]]])  # predict all, predict none
    masks = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 0.0]]]])
    # image 1: 1 of 2 pixels; image 2: both empty, scores 1. Pooled it would be 0.5.
    assert image_iou(Logits(), (images, masks)) == pytest.approx(0.75)


def _arm(name, iou, low, high, std, noisy, spread):
    return ArmSummary(name, name, 16, 16, 1, 1e-3, 0, 3, iou, low, high, std, spread, None,
                      noisy, 10.0)  # fmt: skip


def test_claims_follow_the_numbers(tiny_case):
    memory = tiny_case[1].memory
    held = judge_claims(
        memory, (_arm("b16", 0.80, 0.79, 0.81, 0.02, 3, 0.4), _arm("b64-accum", 0.85, 0.84, 0.86,
                 0.01, 0, 0.2)),
    )  # fmt: skip
    verdicts = {claim.claim: claim.verdict for claim in held}
    assert verdicts["IoU improves by 5%"] == "held"
    assert verdicts["validation IoU fluctuates a lot at batch 16"] == "held"
    assert verdicts["the model takes 3 GB"] == "did not hold"  # 0.5 GB, not 3
    assert verdicts["each image takes about 0.5 GB"] == "roughly"  # 0.38 GB
    assert verdicts["16 (a power of two) is chosen"] == "held"
    # +5% but overlapping seed ranges: not shown.
    overlap = judge_claims(
        memory, (_arm("b16", 0.80, 0.70, 0.90, 0.02, 0, 0.4), _arm("b64-accum", 0.84, 0.75,
                 0.95, 0.03, 0, 0.5)),
    )  # fmt: skip
    verdicts = {claim.claim: claim.verdict for claim in overlap}
    assert verdicts["IoU improves by 5%"] == "did not hold"
    assert verdicts["accumulation calms the IoU"] == "did not hold"
    # runs that learned nothing (IoU 0 in every run, one epoch): nothing to judge, no "+nan%"
    untrained = judge_claims(
        memory, (_arm("b16", 0.0, 0.0, 0.0, 0.0, 1, 0.4), _arm("b64-accum", 0.0, 0.0, 0.0, 0.0,
                 0, 0.2)),
    )  # fmt: skip
    verdicts = {claim.claim: claim.verdict for claim in untrained}
    for claim in ("IoU improves by 5%", "accumulation calms the IoU",
                  "validation IoU fluctuates a lot at batch 16"):  # fmt: skip
        assert verdicts[claim] == "cannot tell", claim
    assert not any("nan" in claim.evidence for claim in untrained)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"seeds": 0}, "seeds"),
        ({"epochs": 0}, "epochs"),
        ({"last_evaluations": 0}, "last_evaluations"),
        ({"eval_samples": 1.5}, "eval_samples"),
    ],
)
def test_bad_options_are_refused_before_any_work(tmp_path, options, words):
    with pytest.raises(ConfigError, match=words):
        run_unet_case(tmp_path, **options)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_full_case_as_documented(tmp_path):
    result = run_unet_case(tmp_path)
    assert len(result.runs) == 9 and len(result.claims) >= 6


def test_cli_prints_the_tables_and_claims(tiny_case, monkeypatch, tmp_path, capsys):
    from batchfit.cli.main import main
    from batchfit.examples import case_unet

    seen = {}

    def fake_run(out_dir, **options):
        seen.update(options, out_dir=out_dir)
        return tiny_case[1]

    monkeypatch.setattr(case_unet, "run_unet_case", fake_run)
    out = tmp_path / "case"
    assert main(["case", "unet", "--out", str(out), "--seeds", "2", "--epochs", "1.5"]) == 0
    assert (seen["seeds"], seen["epochs"], seen["out_dir"]) == (2, 1.5, str(out))
    printed = capsys.readouterr().out
    assert "The guide's claims" in printed and "IoU improves by 5%" in printed
    seen.clear()
    assert main(["case", "unet", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["arms"][0]["arm"] == "b16"
    assert "seeds" not in seen and "epochs" not in seen  # the library's defaults apply


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["case", "tumour"], "invalid choice"),
        (["case", "unet", "--seeds", "0"], "--seeds"),
        (["case", "unet", "--epochs", "0"], "--epochs"),
    ],
)
def test_cli_refuses_bad_input(argv, words, capsys):
    from batchfit.cli.main import main

    assert main(argv) == 2
    assert words in capsys.readouterr().err


def test_cli_refuses_a_folder_that_holds_files(tmp_path, capsys):
    from batchfit.cli.main import main

    (tmp_path / "old.txt").write_text("x")
    assert main(["case", "unet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "already holds files" in err and "--force" in err
