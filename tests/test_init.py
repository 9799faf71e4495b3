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
