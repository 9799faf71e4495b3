import json
import subprocess
import sys

from batchfit.cli.main import main


def test_estimate_worked_examples(capsys):
    assert main(["estimate", "--memory", "24GB", "--model", "4GB", "--per-sample", "0.2GB"]) == 0
    assert capsys.readouterr().out.strip() == "100"
    args = ["estimate", "--memory", "12GB", "--model", "3GB", "--per-sample", "0.5GB"]
    assert main([*args, "--round", "pow2"]) == 0
    assert capsys.readouterr().out.strip().startswith("18, rounded to 16")


def test_estimate_says_when_no_multiple_fits_and_a_bare_fraction_is_not_a_byte(capsys):
    args = ["estimate", "--memory", "24GB", "--model", "4GB"]
    assert main([*args, "--per-sample", "0.2GB", "--round", "128"]) == 0
    assert capsys.readouterr().out.strip() == "100 (not rounded: no multiple of 128 fits)"
    assert main([*args, "--per-sample", "0.2"]) == 2  # bytes: less than one
    assert "less than one byte: a number without a unit counts bytes" in capsys.readouterr().err


def test_a_device_memory_without_a_unit_is_refused_below_a_mebibyte(capsys):
    """`--memory 12` meant gigabytes: 12 bytes is refused where it is typed, not reported as
    a model that does not fit in "12 B"; a count of bytes that is a device's size still works."""
    args = ["--model", "3GB", "--per-sample", "45MB"]
    assert main(["estimate", "--memory", "12", *args]) == 2
    assert "--memory 12 is 12 bytes (a number without a unit counts bytes)" in (
        capsys.readouterr().err
    )
    assert main(["estimate", "--memory", "12000000000", *args]) == 0
    assert capsys.readouterr().out.strip() == "200"
    assert main(["memory", "--example", "digits", "--memory-budget", "12"]) == 2
    assert "write a unit, e.g. --memory-budget 12GiB" in capsys.readouterr().err


def test_a_negative_size_after_a_space_gets_the_equals_hint(capsys):
    argv = ["estimate", "--memory", "-24GB", "--model", "4GB", "--per-sample", "1GB"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "expected one argument (a value that starts with '-' goes after '='" in err
    assert main(["estimate", "--memory=-24GB", "--model", "4GB", "--per-sample", "1GB"]) == 2
    assert "--memory must be positive, got '-24GB'" in capsys.readouterr().err


def test_estimate_takes_a_reserve_of_0_and_says_what_a_reserve_leaves(capsys):
    args = ["estimate", "--memory", "24GB", "--model", "4GB", "--per-sample", "0.2GB"]
    for nothing in ("0", "0GB", "0.0 MiB"):  # the help says "default 0"
        assert main([*args, "--reserve", nothing]) == 0
        assert capsys.readouterr().out.strip() == "100"
    assert main([*args, "--reserve", "0XB"]) == 2
    assert "--reserve '0XB' is not a size" in capsys.readouterr().err
    assert main([*args, "--reserve=--"]) == 2  # argparse hands the action an empty list
    assert "--reserve [] is not a size" in capsys.readouterr().err
    assert main([*args, "--reserve", "20GB"]) == 2
    err = capsys.readouterr().err
    assert "Not one sample fits" in err and "(3.73 GiB after the 18.63 GiB reserve)" in err
    assert main([*args, "--reserve", "24GB"]) == 2
    err = capsys.readouterr().err
    assert "the reserve (22.35 GiB) takes all of the 22.35 GiB" in err and "Lower --reserve" in err


def test_estimate_takes_a_model_of_0_as_the_library_does(capsys):
    # "--model must be positive, got '0'", where max_batch_size takes fixed_bytes=0.
    args = ["estimate", "--memory", "24GB", "--per-sample", "1GB"]
    for nothing in ("0", "0GB"):
        assert main([*args, "--model", nothing]) == 0
        assert capsys.readouterr().out.strip() == "24"
    assert main([*args, "--model", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fixed_bytes"] == 0
    assert main(["estimate", "--memory", "24GB", "--model", "1GB", "--per-sample", "0"]) == 2
    assert "--per-sample must be positive, got '0'" in capsys.readouterr().err


def test_estimate_that_fits_not_one_sample_exits_2_as_memory_does(capsys):
    # It printed "0: not one sample fits" and exited 0, as if 0 were an answer to train with.
    args = ["estimate", "--memory", "1GiB", "--model", "2GiB", "--per-sample", "1MiB"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "batchfit: error: Not one sample fits: the model takes 2.00 GiB of 1.00 GiB, and one "
        "sample needs 1.00 MiB. Give more --memory, or lower --model or --per-sample (lower "
        "precision, activation checkpointing, a smaller model).\n"
    )
    assert main([*args, "--json"]) == 2  # the JSON still comes, for scripts that read it
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["max_batch_size"] == 0 and data["batch_size"] == 0
    assert captured.err.startswith("batchfit: error: Not one sample fits")


def test_estimate_json(capsys):
    args = ["estimate", "--memory", "12GB", "--model", "3GB", "--per-sample", "0.5GB"]
    assert main([*args, "--round", "pow2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["max_batch_size"] == 18 and data["batch_size"] == 16


def test_estimate_bad_size_is_one_line_exit_2(capsys):
    code = main(["estimate", "--memory", "12XB", "--model", "3GB", "--per-sample", "0.5GB"])
    captured = capsys.readouterr()
    assert code == 2
    assert "--memory '12XB' is not a size" in captured.err
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom batchfit.cli.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().endswith("False")


def test_cli_example_names_match_the_task_module():
    # the CLI keeps its own copy so that `batchfit --help` need not import the task module.
    from batchfit.cli.arguments import EXAMPLES as _EXAMPLES
    from batchfit.task import EXAMPLES

    assert _EXAMPLES == EXAMPLES


def test_estimate_takes_a_card_and_keeps_what_cuda_keeps(capsys):
    # A100-80GB: 80 GiB, less 1 GiB of CUDA context and 5% for fragmentation = 5 GiB
    args = ["estimate", "--memory", "a100_80gb", "--model", "4GiB", "--per-sample", "1GiB"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(80 - 5 - 4)
    assert "A100-80GB: 80.00 GiB, less 5.00 GiB reserve" in lines[1]
    assert main([*args, "--reserve", "0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["max_batch_size"], data["card"], data["reserve_bytes"]) == (76, "A100-80GB", 0)
    assert main(["estimate", "--memory", "Z100", "--model", "4GB", "--per-sample", "1GB"]) == 2
    assert "not a size (such as 24GiB) or a known card; the cards are T4" in capsys.readouterr().err
