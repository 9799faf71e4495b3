"""The shared argument helpers of the `batchfit` command line: the parser class, and actions
that convert and check numbers, sizes and lists as they are parsed.

Every flag defaults to None, so the library's own defaults apply to what the user leaves out
(the help text states them). Numbers are converted and range-checked as they are parsed
(`batchfit.validation`), so a bad value is refused in one line before a task is loaded or any
memory is allocated. A parse error is a `ConfigError` too: one line, exit 2, like any other.
Imports neither torch nor the heavy parts of the library, so `batchfit --help` starts fast.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any

from batchfit.errors import ConfigError
from batchfit.units import UNITS_HELP, parse_size
from batchfit.validation import (
    MAX_BATCH_SIZE,
    MAX_COUNT,
    MAX_LEARNING_RATE,
    parse_number,
)

EXAMPLES = ("digits", "cnn", "unet", "charlm")
"""The built-in example tasks, kept in step with batchfit.task.EXAMPLES (a test checks it), so
that `batchfit --help` need not import the task module."""

_MAX_BATCH_SIZES = 64  # sizes in one --batch-sizes list: more is a typo, not a measurement


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are ConfigErrors: one line, printed by `main`, exit 2."""

    def error(self, message: str) -> Any:  # argparse's hook; never returns
        if message.endswith("expected one argument"):
            # "--memory -24GB": argparse takes a value that starts with "-" for another flag
            message += " (a value that starts with '-' goes after '=', e.g. --flag=-1)"
        raise ConfigError(f"{message}; see `{self.prog} --help`.")


class Number(argparse.Action):
    """A flag whose value is a number in a range, converted and checked as it is parsed.

    Extra `add_argument` keywords: kind (int or float), minimum, maximum, open_minimum,
    open_maximum (see `batchfit.validation.parse_number`).
    """

    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str,
        *,
        kind: type = float,
        minimum: float,
        maximum: float,
        open_minimum: bool = False,
        open_maximum: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.bounds = dict(
            kind=kind,
            minimum=minimum,
            maximum=maximum,
            open_minimum=open_minimum,
            open_maximum=open_maximum,
        )

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        name = option_string or self.dest
        setattr(namespace, self.dest, parse_number(values, name=name, **self.bounds))


class Warmup(argparse.Action):
    """--warmup: whole steps ("500"), a fraction ("0.05" or "5%"), or auto (None)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, parse_warmup(values, option_string or "--warmup"))


def parse_warmup(text: str, name: str = "--warmup") -> int | float | None:
    """Whole steps ("50"), a fraction of training ("0.05" or "5%"), or None for "auto".

    Example:
        >>> parse_warmup("5%"), parse_warmup("50"), parse_warmup("auto")
        (0.05, 50, None)
    """
    text = text.strip()
    if text == "auto":
        return None
    if text.endswith("%"):
        share = parse_number(text[:-1], name=name, minimum=0, maximum=100, open_maximum=True)
        return share / 100
    if "." in text or "e" in text.lower():
        return parse_number(text, name=name, minimum=0, maximum=1, open_maximum=True)
    return parse_number(text, name=name, kind=int, minimum=0, maximum=MAX_COUNT)


class Size(argparse.Action):
    """A memory size such as 12GiB, converted to bytes (`batchfit.units.parse_size`).

    Extra `add_argument` keywords: zero=True also takes a size of nothing ("0", "0GB");
    cards=True also takes a card's name ("A100-80GB", `batchfit.memory.cards`): its memory in
    bytes, and the card in `<dest>_card` (None for a size); capacity=True (a device's memory)
    refuses a number without a unit under 1 MiB: `--memory 12` meant gigabytes, not 12 bytes.
    """

    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str,
        *,
        zero: bool = False,
        cards: bool = False,
        capacity: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.zero, self.cards, self.capacity = zero, cards, capacity

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if self.zero and isinstance(values, str) and _is_zero_size(values):
            setattr(namespace, self.dest, 0)
            return
        if self.cards and isinstance(values, str) and values.strip()[:1].isalpha():
            from batchfit.memory.cards import memory_target

            target = memory_target(values)  # ConfigError naming the known cards
            setattr(namespace, self.dest, target.memory_bytes)
            setattr(namespace, f"{self.dest}_card", target.card)
            return
        name = option_string or self.dest
        size = parse_size(values, name=name)
        if self.capacity and size < 2**20 and re.fullmatch(r"\s*[\d.]+\s*", str(values)):
            raise ConfigError(
                f"{name} {values} is {size} bytes (a number without a unit counts bytes), "
                f"too little for any device; write a unit, e.g. {name} {values}GiB."
            )
        setattr(namespace, self.dest, size)


def _is_zero_size(text: str) -> bool:
    """ "0", "0GB", "0.0 MiB": nothing, in a unit parse_size knows."""
    match = re.fullmatch(r"\s*0*\.?0*\s*([A-Za-z]*)\s*", text)
    if match is None or "0" not in text:
        return False
    try:
        parse_size(f"1{match.group(1)}")
    except ConfigError:
        return False  # an unknown unit: parse_size's own message says so
    return True


class Rounding(argparse.Action):
    """--round pow2 / none / 8, checked as it is parsed (`batchfit.memory.rounding`)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from batchfit.memory.rounding import check_round_to

        setattr(namespace, self.dest, check_round_to(values, name=option_string or "--round"))


class BatchSizes(argparse.Action):
    """--batch-sizes 8,16,32: a list of batch sizes, each checked."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        name = option_string or "--batch-sizes"
        parts = [part.strip() for part in values.split(",")]
        spaced = next((part for part in parts if len(part.split()) > 1), None)
        if spaced is not None:
            # "8 16" read as 816 once the spaces were dropped: a list, not one size.
            raise ConfigError(
                f"{name} {values[:40]!r} separates sizes by spaces ({spaced!r}); separate them "
                f"by commas, e.g. {name} {','.join(spaced.split())}."
            )
        if parts != [""] and "" in parts:
            # "16,,32" or "16,32,": an item left out by mistake, not a list of two sizes.
            raise ConfigError(
                f"{name} {values[:40]!r} has an empty item (item {parts.index('') + 1}); give "
                f"sizes separated by single commas, e.g. {name} 8,16,32."
            )
        parts = [part for part in parts if part]
        if not parts or len(parts) > _MAX_BATCH_SIZES:
            raise ConfigError(
                f"{name} takes 1 to {_MAX_BATCH_SIZES} sizes, got {len(parts)}; e.g. {name} "
                "8,16,32."
            )
        sizes = []
        for part in parts:
            try:
                sizes.append(
                    parse_number(part, name=name, kind=int, minimum=1, maximum=MAX_BATCH_SIZE)
                )
            except ConfigError:
                raise ConfigError(
                    f"{name} {values[:40]!r} is not a list of whole numbers from 1 to "
                    f"{MAX_BATCH_SIZE}; e.g. {name} 8,16,32."
                ) from None
        setattr(namespace, self.dest, sizes)


# --- shared argument helpers -------------------------------------------------------------


def add_number(
    parser: argparse.ArgumentParser, flag: str, help: str, *, kind: type = float, **bounds: Any
) -> None:
    parser.add_argument(flag, action=Number, kind=kind, help=help, **bounds)


def add_batch(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """A batch size in samples: 1 to MAX_BATCH_SIZE."""
    add_number(parser, flag, help, kind=int, minimum=1, maximum=MAX_BATCH_SIZE)


def add_count(parser: argparse.ArgumentParser, flag: str, help: str, *, minimum: int = 1) -> None:
    """A count of steps, batches or repeats: `minimum` to MAX_COUNT."""
    add_number(parser, flag, help, kind=int, minimum=minimum, maximum=MAX_COUNT)


def add_rate(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """A learning rate: above 0, at most MAX_LEARNING_RATE."""
    add_number(parser, flag, help, minimum=0, maximum=MAX_LEARNING_RATE, open_minimum=True)


def add_epochs(parser: Any, help: str, *, maximum: float = MAX_COUNT) -> None:
    """A run length in passes over the training data: above 0, at most `maximum`."""
    add_number(parser, "--epochs", help, minimum=0, maximum=maximum, open_minimum=True)


def add_share(
    parser: argparse.ArgumentParser, flag: str, help: str, *, open_minimum: bool = False
) -> None:
    """A share of something in [0, 1) (or (0, 1) with open_minimum)."""
    add_number(
        parser, flag, help, minimum=0, maximum=1, open_minimum=open_minimum, open_maximum=True
    )


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "task",
        nargs="?",
        help="the training task: path/to/file.py:function or package.module:function",
    )
    parser.add_argument("--example", choices=EXAMPLES, help="use a built-in example task")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps or auto (default: auto)")
    parser.add_argument(
        "--memory-budget",
        metavar="SIZE",
        action=Size,
        capacity=True,
        help=f"pretend the device has this much memory, e.g. 12GiB ({UNITS_HELP})",
    )


class Card(argparse.Action):
    """--gpu NAME: a card from `batchfit.memory.cards` or a size, checked while flags are read."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        from batchfit.memory.cards import memory_target

        memory_target(value)  # raises ConfigError naming the known cards
        setattr(namespace, self.dest, value)


def add_card_argument(parser: argparse.ArgumentParser) -> None:
    from batchfit.memory.cards import CARDS

    parser.add_argument(
        "--gpu",
        "--device-memory",
        dest="gpu",
        metavar="NAME",
        action=Card,
        help=f"the card to answer for: {', '.join(card.name for card in CARDS)}, or a size; "
        "answered from the prediction alone when this machine cannot hold it",
    )


def add_round_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--round", action=Rounding, help="pow2, none, or a multiple such as 8 (default none)"
    )


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def add_plot_argument(parser: argparse.ArgumentParser, what: str, *, needs: str = "") -> None:
    needed = f" (needs {needs})" if needs else ""
    parser.add_argument("--plot", metavar="FILE.png", help=f"save {what} as a PNG{needed}")


def add_out_arguments(parser: argparse.ArgumentParser, metavar: str, help: str) -> None:
    parser.add_argument("--out", metavar=metavar, help=help)
    parser.add_argument(
        "--force", action="store_true", help="write into --out even if it already holds files"
    )


# --- reading the parsed arguments ------------------------------------------------------------


def given(args: argparse.Namespace, **names: str) -> dict[str, Any]:
    """{parameter: args.<attribute>} for each attribute the user gave (not None)."""
    return {
        param: getattr(args, attr)
        for param, attr in names.items()
        if getattr(args, attr) is not None
    }


def budget_or_card(args: argparse.Namespace) -> dict[str, Any]:
    """{"memory_budget": ...} from --gpu (a card's name or a size) or --memory-budget."""
    if args.gpu is not None and args.memory_budget is not None:
        raise ConfigError("give --gpu or --memory-budget, not both.")
    value = args.gpu if args.gpu is not None else args.memory_budget
    return {} if value is None else {"memory_budget": value}


def load_task_from_args(args: argparse.Namespace):
    """The task the arguments name (a task spec or --example)."""
    from batchfit.task import load_example, load_task

    if args.task and args.example:
        raise ConfigError("Give a task or --example, not both.")
    if args.example:
        return load_example(args.example)
    if args.task:
        return load_task(args.task)
    raise ConfigError(f"No task given: {TASK_HELP}.")


TASK_HELP = f"name one as path/to/file.py:function, or use --example ({', '.join(EXAMPLES)})"
