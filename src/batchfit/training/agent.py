"""The torchrun agent that `batchfit train --nproc N` starts: torch.distributed.run, quietly.

`python -m batchfit.training.agent <torchrun arguments>` runs torchrun's own launcher
(`torch.distributed.run.run`) but ends without torchrun's traceback: it writes each rank's exit
code, and which rank failed first, to `agent.json` in the folder `BATCHFIT_ERROR_DIR` names and
exits 0 (all ranks done), 130 (interrupted) or 1 (a rank failed).
`batchfit.training.launcher.launch` reads that file and the ranks' own error lines and turns
them into one line and exit code 2.

The agent and the ranks run in sessions of their own, so a Ctrl-C (or a SIGTERM to the
launcher) reaches them one way only: the launcher sends the agent SIGINT, torchrun passes it on
once, the ranks stop at the end of their step, save a checkpoint and exit 130, and the agent
exits 130 too. (torchrun kills a rank that has not stopped 30 s later.)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

ERROR_DIR_VARIABLE = "BATCHFIT_ERROR_DIR"
"""The folder where the ranks write their error line and the agent its exit codes."""

AGENT_FILE = "agent.json"


def main(argv: Sequence[str] | None = None) -> int:
    """Run torchrun with `argv` (its own arguments); returns 0, 1 (a rank failed) or 130."""
    quiet = os.environ.get("BATCHFIT_VERBOSE") != "1"
    if quiet:
        # torchrun's own warnings and its error report; batchfit words the outcome itself.
        # Its loggers take their level from LOGLEVEL when they are made (at import).
        os.environ["LOGLEVEL"] = "CRITICAL"
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if quiet:
        for name in ("torch.distributed.elastic", "torch.distributed.run"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    summary: dict = {"exitcodes": {}, "outcome": 0}
    try:
        run(args)
    except ChildFailedError as error:
        summary = failure_summary(error)
    except SignalException as error:  # the ranks were sent the same signal and have stopped
        summary["outcome"] = 128 + int(error.sigval)
    _write_summary(summary)
    return summary["outcome"]


def failure_summary(error: ChildFailedError) -> dict:
    """The ranks' exit codes, the rank that failed first (the cause: torchrun stops the others
    after it) and the agent's outcome, 130 when every rank was interrupted, else 1."""
    codes = {int(rank): int(failure.exitcode) for rank, failure in error.failures.items()}
    # torchrun records the first failures before the ranks it stops, in the same second at
    # times: the earliest timestamp, ties to the first recorded.
    first, _ = error.get_first_failure()
    interrupted = all(code in (130, -signal.SIGINT) for code in codes.values())
    return {"exitcodes": codes, "first": int(first), "outcome": 130 if interrupted else 1}


def _write_summary(summary: dict) -> None:
    folder = os.environ.get(ERROR_DIR_VARIABLE)
    if folder:
        (Path(folder) / AGENT_FILE).write_text(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
