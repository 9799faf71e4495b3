import json

import pytest

from batchfit.cli.main import main

TINY = ["--repeats", "1", "--warmup-steps", "0", "--min-seconds", "0"]


def test_table_marks_the_knee(capsys):
    code = main(["throughput", "--example", "digits", "--batch-sizes", "2,8", *TINY])
    captured = capsys.readouterr()
    assert code == 0
    assert "samples/s" in captured.out and "knee" in captured.out
    assert ("Knee: batch" in captured.out) != ("still grows at the largest batch" in captured.out)


def test_json(capsys):
    argv = ["throughput", "--example", "charlm", "--batch-sizes", "1,2", *TINY, "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["batch_sizes"] == [1, 2]
    # The knee is the smaller batch exactly when it reaches 90% of the larger one's throughput.
    slow, fast = data["samples_per_second"]
    assert data["knee_batch"] == (1 if slow >= 0.9 * max(slow, fast) else 2)
    assert len(data["tokens_per_second"]) == 2  # charlm counts tokens


def test_default_sizes_up_to_max_batch_and_plot(tmp_path, capsys):
    path = tmp_path / "throughput.png"
    argv = ["throughput", "--example", "digits", "--max-batch", "6", *TINY, "--plot", str(path)]
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["limit_batch"] == 6 and data["limit_reason"] == "max_batch_size"
    # Powers of two up to the limit, the limit included; measuring may stop early when larger
    # batches stop paying (a timing matter), never past the limit.
    assert data["batch_sizes"] == [1, 2, 4, 6][: len(data["batch_sizes"])]
    assert data["stopped_early"] or data["batch_sizes"][-1] == 6
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", ["digits", "cnn", "unet", "charlm"])
def test_every_example(name, capsys):
    argv = ["throughput", "--example", name, "--batch-sizes", "1,2", *TINY, "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["batch_sizes"] == [1, 2]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--batch-sizes", "8,abc"], "is not a list of whole numbers"),
        (["--batch-sizes", "0,8"], "not a list of whole numbers from 1"),
        (
            ["--batch-sizes", "8 16"],
            "separates sizes by spaces ('8 16'); separate them by commas, e.g. --batch-sizes 8,16.",
        ),
        (["--batch-sizes", "4, 8 16"], "e.g. --batch-sizes 8,16."),
        (["--batch-sizes", "8,4096"], "batch size 4096 is above 1438: the training data has"),
        (["--batch-sizes", "8,64", "--max-batch", "32"], "max_batch_size is 32"),
        (["--max-batch", "-3"], "--max-batch must lie in [1, 16777216], got -3"),
        (["--repeats", "0"], "--repeats must lie in [1, 1000000000], got 0"),
        (["--fraction", "2"], "--fraction must lie in (0, 1], got 2.0"),
        (["--plot", "t.jpg"], "must end in .png"),
    ],
)
def test_bad_input_is_one_line_exit_2(extra, words, capsys):
    code = main(["throughput", "--example", "digits", *extra])
    captured = capsys.readouterr()
    assert code == 2
    assert words in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err


def test_batch_sizes_above_what_fits(capsys):
    argv = ["throughput", "tests.conftest:make_mlp_task", "--batch-sizes", "8,250"]
    code = main([*argv, "--memory-budget", "32KiB", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 2 and "batch size 250 does not fit" in captured.err
    assert "on this machine is" in captured.err and len(captured.err.strip().splitlines()) == 1


def test_help_names_the_statistic_the_measurement_uses(capsys):
    from batchfit.throughput.timing import STEP_QUANTILE

    with pytest.raises(SystemExit):
        main(["throughput", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "median" not in text  # the steps are read at a low quantile, not the median
    assert f"the {STEP_QUANTILE:.0%} quantile of the timed steps" in text
