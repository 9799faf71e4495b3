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


def test_a_signal_the_process_ignores_stays_ignored(caplog):
    # A background job's SIGINT (and a sweep worker's) is ignored: training took it over, so
    # Ctrl-C in the terminal stopped a job started with `&`, and each sweep worker printed
    # "stopping after this step".
    caplog.set_level(logging.WARNING, logger="batchfit.training.progress")
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_on_signals() as flag:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert not flag["stop"]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert "stopping after this step" not in caplog.text


def test_the_signal_is_named_and_said_by_the_announcing_process_alone(caplog):
    # Under DDP every rank said "signal 2: stopping after this step ..." for one Ctrl-C;
    # rank 0 alone announces now, and names the signal.
    caplog.set_level(logging.WARNING, logger="batchfit.training.progress")
    with stop_on_signals(announce=False) as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag["stop"]
    assert caplog.text == ""
    with stop_on_signals() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag["stop"]
    assert "Ctrl-C (SIGINT): stopping after this step and saving a checkpoint" in caplog.text
    assert "signal 2" not in caplog.text
