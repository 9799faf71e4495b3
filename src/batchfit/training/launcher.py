"""Launching torchrun for the user: `batchfit train --nproc N` runs its own arguments again
under `torchrun --nproc_per_node N` (`torchrun_command`, on 127.0.0.1 with a free port) and turns
what the ranks and torchrun's agent leave behind into one line and one exit code (`launch`).
The ranks themselves find each other with `batchfit.training.distributed`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batchfit.errors import ConfigError, DistributedError
from batchfit.interrupts import signals_as_interrupt

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def torchrun_command(
    nproc: int,
    argv: Sequence[str],
    *,
    port: int | None = None,
    runner: str = "torch.distributed.run",
) -> list[str]:
    """The command that runs `python -m batchfit <argv>` in `nproc` processes under torchrun.

    One machine, rendezvous on 127.0.0.1 at `port` (default: a free one). `runner` is the
    module that launches: torchrun itself, or `batchfit.training.agent` (torchrun without its
    traceback, as `launch` uses).

    Raises:
        ConfigError: `nproc` is not a positive int.

    Example:
        >>> torchrun_command(2, ["train", "--example", "digits"], port=29500)[3:6]
        ['--nproc-per-node', '2', '--nnodes']
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"--nproc must be a positive number of processes, got {nproc!r}.")
    return [
        sys.executable,
        "-m",
        runner,
        "--nproc-per-node",
        str(nproc),
        "--nnodes",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port if port is not None else free_port()),
        "-m",
        "batchfit",
        *argv,
    ]


def launch(nproc: int, argv: Sequence[str], *, verbose: bool = False) -> int:
    """Run `batchfit <argv>` in `nproc` processes under torchrun; returns 0 when all finished,
    or rank 0's own exit code when it ended otherwise without an error (3: stopped by the live
    diagnosis).

    The processes share this terminal's stdout and stderr. Each rank writes its error line to
    a private folder instead of the terminal (`batchfit.cli.main`), and the agent
    (`batchfit.training.agent`) its ranks' exit codes; a failure becomes one `DistributedError`
    line: the first rank's own error (a collective timeout only when no rank said more).

    Ctrl-C, or SIGTERM or SIGHUP to this process, reaches the ranks through the agent: they save
    a checkpoint at the end of the step and stop, and this raises KeyboardInterrupt (exit 130).
    A second Ctrl-C ends the agent. Should this process be killed (SIGKILL), the agent gets
    SIGINT from the kernel (Linux), and the ranks stop the same way.

    Args:
        nproc: processes on this machine.
        argv: the `batchfit` arguments for each process (without --nproc).
        verbose: keep torchrun's own warnings and report (the ranks' tracebacks come with -v).

    Raises:
        DistributedError: a rank failed; the message is its own line, or its exit code.
        KeyboardInterrupt: the run was interrupted (the ranks saved a checkpoint).
    """
    import signal
    import subprocess
    import tempfile

    from batchfit.training.agent import ERROR_DIR_VARIABLE

    command = torchrun_command(nproc, argv, runner="batchfit.training.agent")
    logger.info("launching: %s", " ".join(command))
    with tempfile.TemporaryDirectory(prefix="batchfit-ranks-") as folder:
        environ = {**os.environ, ERROR_DIR_VARIABLE: folder}
        if verbose:
            environ["BATCHFIT_VERBOSE"] = "1"
        # The agent runs in a session of its own, so each stop reaches it once, from here: a
        # terminal's Ctrl-C (the whole group) and a SIGTERM sent to this process alone (a job
        # scheduler, `timeout`) alike, and the hangup of a closed terminal.
        # Should this process die without a word (SIGKILL, the out-of-memory killer), the
        # agent hears SIGINT, as on Ctrl-C, instead of training on with nobody waiting for it.
        process = subprocess.Popen(
            command, env=environ, start_new_session=True, preexec_fn=_interrupt_on_parent_death
        )
        interrupted = False
        with signals_as_interrupt("SIGHUP"):
            while True:
                try:
                    code = process.wait()
                    break
                except KeyboardInterrupt:
                    # The agent passes SIGINT on: the ranks save a checkpoint at the end of the
                    # step and stop. A second Ctrl-C ends the agent.
                    if interrupted:
                        process.terminate()
                    else:
                        process.send_signal(signal.SIGINT)
                    interrupted = True
        if code == 0:
            return 0
        outcome = _read_outcome(Path(folder))
    if interrupted or code == 130 or outcome["interrupted"]:
        raise KeyboardInterrupt
    if outcome.get("code") is not None:
        return outcome["code"]
    raise DistributedError(outcome["line"] or f"the training processes failed (exit code {code}).")


def _interrupt_on_parent_death() -> None:
    """In the launched agent, before it starts: SIGINT when its parent dies (Linux's
    PR_SET_PDEATHSIG); elsewhere nothing."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGINT))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


def _read_outcome(folder: Path) -> dict[str, Any]:
    """What the ranks and the agent left in `folder`: the line to show, and whether the run was
    interrupted."""
    from batchfit.training.agent import AGENT_FILE

    errors, stdout_closed = [], False
    for path in sorted(folder.glob("rank*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("kind") == "StdoutClosed":  # `batchfit.cli.main.STDOUT_CLOSED`
            stdout_closed = True
        else:
            errors.append(record)
    try:
        summary = json.loads((folder / AGENT_FILE).read_text())
    except (OSError, ValueError):
        summary = {"exitcodes": {}, "outcome": None}
    codes = {int(rank): code for rank, code in summary.get("exitcodes", {}).items()}
    interrupted = summary.get("outcome") == 130
    # The cause first: a rank's own error before the collective failures it caused elsewhere.
    errors.sort(key=lambda error: (error.get("kind") == "DistributedError", error.get("rank", 0)))
    first = summary.get("first")
    caused = not errors or errors[0].get("kind") == "DistributedError"
    if caused and codes.get(first) in (130, -2):
        # A stop signal reached one rank alone (130: batchfit's interrupted exit, -2: SIGINT
        # before its handler); the others failed or were killed because it left.
        return {"line": None, "interrupted": True}
    if errors:
        first = errors[0]
        line = first["line"]
        if not line.startswith("rank "):
            line = f"rank {first.get('rank')}: {line}"
        return {"line": line, "interrupted": False}
    if stdout_closed:  # `train --nproc 2 | head`: the reader left; as quiet as one process
        return {"line": None, "interrupted": interrupted, "code": 1}
    failed = {rank: code for rank, code in codes.items() if code != 0}
    own = failed.get(0, 0)
    if not errors and first in (0, None) and own > 0 and own not in (1, 130):
        # Rank 0 ended first, by itself, with a code of its own (3: stopped by the live
        # diagnosis) and said nothing wrong: the run's exit code. Any other rank still tearing
        # down then was stopped by torchrun.
        return {"line": None, "interrupted": interrupted, "code": own}
    if failed:
        # torchrun ends the other ranks with SIGTERM once one fails: name the one that failed.
        rank, code = min(
            failed.items(), key=lambda item: (item[0] != first, item[1] == -15, item[0])
        )
        how = f"signal {-code} ({_signal_name(-code)})" if code < 0 else f"exit code {code}"
        return {
            "line": f"rank {rank} ended with {how}, before it could say why (its output, if "
            "any, is above); run with -v for torchrun's own report.",
            "interrupted": interrupted,
        }
    return {"line": None, "interrupted": interrupted}


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown"
