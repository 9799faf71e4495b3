import logging
import os
import signal

import pytest

from batchfit.training.progress import stop_on_signals


@pytest.mark.parametrize("checkpoint", [True, False])
def test_a_signal_requests_a_stop_and_says_whether_a_checkpoint_is_saved(caplog, checkpoint):
    caplog.set_level(logging.WARNING, logger="batchfit.training.progress")
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(checkpoint=checkpoint) as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag["stop"]
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back
    assert "stopping after this step" in caplog.text
    assert ("saving a checkpoint" in caplog.text) is checkpoint
