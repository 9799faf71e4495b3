"""`batchfit`'s entry point: parse, run one subcommand, and turn failures into exit codes.

One error path: every failure batchfit raises on purpose (`BatchfitError`, parse errors
included) is printed as one line, `batchfit: error: ...`, with exit code 2; Ctrl-C exits 130.
An exception raised inside the user's own task code while it runs
(`batchfit.task.task_code_error`) is one line too, naming the file and line. With -v the
traceback follows the line. Anything else is a bug in batchfit and keeps its traceback.
A reader of stdout that goes away (`batchfit ... --json | head -1`) ends the command quietly with
exit code 1, as rich's console does for the commands that print tables.

SIGTERM (what `kill`, a job scheduler or torchrun sends) is handled as Ctrl-C: it raises
KeyboardInterrupt, so a file being written is cleaned up as on Ctrl-C (`write_atomic` removes
its temporary file and the previous file stays), and the command prints one line and exits
130. `train` turns the first SIGINT or SIGTERM into a stop after the step with a checkpoint;
the second one now ends it the same way for both signals.

Under a bare `torchrun -m batchfit ...` every rank meets the same bad input: rank 0 alone prints
the line (and "interrupted"), every rank exits 2 (130), and each failing rank leaves its line in
the file torchrun names in TORCHELASTIC_ERROR_FILE, so torchrun's own failure report (printed
after any failed rank, whatever its exit code) shows it where it would say "To enable traceback
see ...": an error of one rank alone is not lost there. With -v every rank prints.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from batchfit.errors import BatchfitError
from batchfit.interrupts import signals_as_interrupt

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_STDOUT_CLOSED = 1  # what rich's console exits with on a broken pipe
STDOUT_CLOSED = "StdoutClosed"  # the kind a rank's record names for its launcher
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 stdout closed, 2 bad input,
    130 interrupted).

    Args:
        argv: the arguments after the program name; None reads `sys.argv[1:]`.

    Example:
        >>> main(["estimate", "--memory", "24GB", "--model", "4GB", "--per-sample", "0.2GB"])
        100
        0
    """
    from batchfit.cli.parser import build_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    with signals_as_interrupt("SIGTERM"):
        try:
            args = build_parser().parse_args(argv)
            args.argv = argv  # what the user typed: `train --nproc` forwards it to torchrun
            logging.basicConfig(
                level=logging.DEBUG if args.verbose else logging.WARNING,
                format="%(levelname)s %(name)s: %(message)s",
                stream=sys.stderr,
            )
            from batchfit.cli.commands import COMMANDS

            code = COMMANDS[args.command](args)
            sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
            return code
        except BatchfitError as error:
            _report(error, verbose)
            return EXIT_BAD_INPUT
        except Exception as error:
            if isinstance(error, BrokenPipeError) and _stdout_reader_gone():
                return _stdout_closed()  # not a pipe of the task's own: that is its error
            from batchfit.task import task_code_error

            line = task_code_error(error)
            if line is None:
                raise
            line.__cause__ = error
            _report(line, verbose)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            # under `--nproc` the launcher says it once, under torchrun rank 0
            if _rank_error_file() is None and (verbose or not _another_rank_says_it()):
                print("batchfit: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no real stdout
        return True


def _stdout_closed() -> int:
    """The reader of stdout went away (`batchfit ... | head -1`): stop quietly, as rich's own
    console does, with exit code 1 and no traceback; stdout goes to the null device so the
    interpreter's last flush finds nothing to complain about. A rank that `batchfit train
    --nproc` started tells its launcher, which then exits 1 as quietly."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError):  # a stdout without a file descriptor (captured): nothing to do
        pass
    rank_file = _rank_error_file()
    if rank_file is not None:
        import json

        rank = int(os.environ.get("RANK", "0"))
        rank_file.write_text(json.dumps({"rank": rank, "kind": STDOUT_CLOSED, "line": ""}))
    return EXIT_STDOUT_CLOSED


def _report(error: BatchfitError, verbose: bool) -> None:
    """`batchfit: error: <one line>` on stderr, the traceback first when verbose.

    A rank that `batchfit train --nproc` started writes the line to its launcher's folder
    instead, so the launcher shows one line for all ranks (`batchfit.training.launcher.launch`).
    """
    if verbose:
        import traceback

        traceback.print_exception(error, file=sys.stderr)
    line = " ".join(str(error).split())
    if verbose:  # the traceback is above: the line's hint to ask for it is not needed
        from batchfit.task import TRACEBACK_HINT

        line = line.replace(TRACEBACK_HINT, "")
    rank_file = _rank_error_file()
    if rank_file is None:
        _record_for_torchrun(error, line)
        if verbose or not _another_rank_says_it():
            print(f"batchfit: error: {line}", file=sys.stderr)
        return
    import json

    rank = int(os.environ.get("RANK", "0"))
    rank_file.write_text(json.dumps({"rank": rank, "kind": type(error).__name__, "line": line}))


def _rank_error_file() -> Path | None:
    """Where this rank writes its error line when `batchfit train --nproc` launched it."""
    folder = os.environ.get("BATCHFIT_ERROR_DIR")
    rank = os.environ.get("RANK")
    if not folder or rank is None or not Path(folder).is_dir():
        return None
    return Path(folder) / f"rank{rank}.json"


def _another_rank_says_it() -> bool:
    """Whether this process is a rank other than 0 under torchrun (RANK, WORLD_SIZE), which
    leaves the line to rank 0: every rank reads the same arguments and meets the same error.
    A rank started by hand (RANK and WORLD_SIZE set without torchrun) says its own: no rank 0
    or failure report shows it otherwise."""
    from batchfit.training.distributed import detect_distributed

    if "TORCHELASTIC_RUN_ID" not in os.environ:  # torchrun sets it in every rank
        return False
    try:
        context = detect_distributed()
    except BatchfitError:  # RANK or WORLD_SIZE that make no sense: say it here
        return False
    return context.enabled and not context.is_main


def _record_for_torchrun(error: BaseException, line: str) -> None:
    """Leave `line` in the error file torchrun gave this rank (TORCHELASTIC_ERROR_FILE), in the
    shape torch's `@record` writes, so torchrun's failure report shows it for each rank."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:  # not under torchrun, or torchrun keeps no log folder ("")
        return
    import json
    import time

    from batchfit.files import write_atomic

    # A `message` mapping without `py_callstack`: the report shows the line, and torchrun can
    # add the exit code to it (it warns about a plain string message).
    message = {
        "message": f"{type(error).__name__}: {line}",
        "extraInfo": {"timestamp": str(int(time.time()))},
    }
    try:
        write_atomic(path, json.dumps({"message": message}))
    except OSError:  # the report then says what it says without the file
        return
