import subprocess
import sys

import batchfit


def test_every_public_name_resolves():
    missing = [name for name in batchfit.__all__ if getattr(batchfit, name, None) is None]
    assert missing == []


def test_import_batchfit_does_not_import_torch():
    code = "import sys, batchfit; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_a_users_own_loop_imports_the_batch_schedule_from_the_top_level():
    from batchfit import BatchSchedule, parse_batch_schedule

    schedule = parse_batch_schedule("ramp:32-64:100", global_batch=64)
    assert isinstance(schedule, BatchSchedule)
    assert schedule.global_batch(0, 100) == 64
