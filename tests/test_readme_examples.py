"""The README stays true: its Python examples run, and its command lines parse.

Each ```python block runs in a fresh interpreter in an empty folder. A block right after
`<!-- not run: REASON -->` is a fragment that is not run (the reason shows as the skip), one
after `<!-- slow: REASON -->` runs only with `-m slow`. Each `$ batchfit ...` line of a
```console block (and each `batchfit ...` line of a ```bash block) is parsed by batchfit's own
argument parser, without running it: a flag that was renamed or removed fails here. A
`python` command names a script that exists, a module that imports, or code that compiles.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from batchfit.cli.parser import build_parser
from batchfit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Extras a block may import; without one installed, the block is skipped with its name.
OPTIONAL = {"lightning", "transformers", "accelerate", "tensorboard", "pytorch_optimizer", "ray"}
MARKER = re.compile(r"<!--\s*(not run|slow):\s*(.*?)\s*-->", re.S)
ERROR_PREFIX = "batchfit: error: "
BLOCK_SECONDS = 300  # the slowest block (a whole plan) takes about 45 s on two CPU cores


@dataclass(frozen=True)
class Block:
    """One fenced block of the README."""

    language: str
    heading: str
    line: int  # 1-based line of the opening fence
    text: str
    marker: tuple[str, str] | None  # ("not run" | "slow", reason) from the line before


def _blocks() -> list[Block]:
    blocks, heading, previous = [], "top", ""
    lines = README.read_text().splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("```") and line.strip() != "```":
            end = index + 1
            while lines[end].strip() != "```":
                end += 1
            match = MARKER.fullmatch(previous.strip())
            marker = (match[1], match[2]) if match else None
            text = "\n".join(lines[index + 1 : end]) + "\n"
            blocks.append(Block(line[3:].strip(), heading, index + 1, text, marker))
            index, previous = end + 1, ""
            continue
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.strip():
            previous = line
        index += 1
    return blocks


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


def _python_params() -> list:
    params, counts = [], {}
    for block in _blocks():
        if block.language != "python":
            continue
        slug = _slug(block.heading)
        counts[slug] = counts.get(slug, 0) + 1
        marks = [pytest.mark.slow] if block.marker and block.marker[0] == "slow" else []
        params.append(pytest.param(block, id=f"{slug}-{counts[slug]}", marks=marks))
    return params


@dataclass(frozen=True)
class Command:
    """One shell command of a console or bash block, with the output shown under it."""

    heading: str
    line: int
    text: str  # continuations joined
    output: tuple[str, ...]
    stdin: str = ""  # a heredoc's document


def _commands() -> list[Command]:
    commands = []
    for block in _blocks():
        if block.language not in ("console", "bash"):
            continue
        prompt = "$ " if block.language == "console" else ""
        lines = block.text.splitlines()
        index = 0
        while index < len(lines):
            if not lines[index].startswith(prompt) or not lines[index].strip():
                index += 1
                continue
            start, text = index, lines[index][len(prompt) :]
            while text.endswith("\\") and index + 1 < len(lines):
                index += 1
                text = text[:-1] + " " + lines[index].strip()
            index += 1
            heredoc, document = re.search(r"<<-?\s*'?(\w+)'?", text), []
            if heredoc:  # the document is the command's input, not its output
                while index < len(lines) and lines[index].strip() != heredoc[1]:
                    document.append(lines[index])
                    index += 1
                index += 1
            output = []
            while prompt and index < len(lines) and not lines[index].startswith(prompt):
                output.append(lines[index])
                index += 1
            stdin = "\n".join(document)
            line = block.line + start + 1
            commands.append(Command(block.heading, line, text, tuple(output), stdin))
    return commands


def _command_params() -> list:
    params, counts = [], {}
    for command in _commands():
        slug = _slug(command.heading)
        counts[slug] = counts.get(slug, 0) + 1
        params.append(pytest.param(command, id=f"{slug}-{counts[slug]}"))
    return params


def _pipeline(text: str) -> list[list[str]]:
    """The simple commands of a shell line: env-var prefixes and redirections taken off."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    segments, current, tokens = [], [], list(lexer)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token in ("|", "||", "&&", ";", "&"):
            segments.append(current)
            current = []
        elif token in (">", ">>", "<", "<<", "<<-", "2>", "&>"):
            index += 1  # the file (or the heredoc's word) goes with the redirection
        elif not current and re.fullmatch(r"[A-Za-z_]\w*=\S*", token):
            pass  # COLUMNS=100 batchfit ...
        else:
            current.append(token)
        index += 1
    segments.append(current)
    return [segment for segment in segments if segment]


@pytest.mark.parametrize("block", _python_params())
def test_readme_python_block_runs(block: Block, tmp_path):
    if block.marker and block.marker[0] == "not run":
        pytest.skip(f"README line {block.line}: {block.marker[1]}")
    for module in re.findall(r"^\s*(?:from|import)\s+(\w+)", block.text, re.M):
        if module in OPTIONAL:
            pytest.importorskip(module, reason=f"the README block at line {block.line} needs it")
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-c", block.text],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_SECONDS,
    )
    assert completed.returncode == 0, (
        f"README.md line {block.line} ({block.heading}) failed:\n{completed.stderr[-3000:]}"
    )


@pytest.mark.parametrize("command", _command_params())
def test_readme_command_line_parses(command: Command):
    where = f"README.md line {command.line}: {command.text}"
    segments = _pipeline(command.text)
    assert segments, where
    for words in segments:
        if words[0] == "batchfit":
            _check_batchfit(words[1:], command.output, where)
        elif words[0] in ("python", "python3"):
            _check_python(words[1:], command.stdin, where)


def _check_batchfit(argv: list[str], output: tuple[str, ...], where: str) -> None:
    shown = output[0] if output and output[0].startswith(ERROR_PREFIX) else None
    try:
        build_parser().parse_args(argv)
    except ConfigError as error:
        # An error the README shows may come from the parser: then it is the same line.
        assert shown is not None, f"{where}\ndoes not parse: {error}"
        assert ERROR_PREFIX + " ".join(str(error).split()) == shown, where
    except SystemExit as exit:  # --help or --version: argparse exits 0
        assert exit.code == 0, where


def _check_python(args: list[str], stdin: str, where: str) -> None:
    if not args or args[0] == "-":  # the script comes from stdin (a heredoc)
        compile(stdin, where, "exec")
    elif args[0] == "-c":
        compile(args[1], where, "exec")
    elif args[0] == "-m":
        assert importlib.util.find_spec(args[1]) is not None, f"{where}\nno module {args[1]}"
    else:
        assert (ROOT / args[0]).is_file(), f"{where}\nno file {args[0]} in the repository"


def _resolve(dotted: str) -> object:
    """The module or attribute a dotted name names; AttributeError/ImportError if none."""
    first, *rest = dotted.split(".")
    found = importlib.import_module(first)
    for part in rest:
        if not hasattr(found, part) and hasattr(found, "__path__"):  # a submodule
            importlib.import_module(f"{found.__name__}.{part}")
        found = getattr(found, part)
    return found


def test_readme_dotted_names_exist():
    """Every `batchfit.x.y` the README names is a module or an attribute of one."""
    names = set(re.findall(r"\bbatchfit(?:\.[A-Za-z_]\w*)+", README.read_text()))
    assert len(names) >= 20
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (ImportError, AttributeError) as error:
            missing.append(f"{name} ({error})")
    assert not missing, missing


def test_readme_repository_paths_exist():
    paths = re.findall(r"\b(?:bench|docs|tests|src|\.ci)/[\w/.-]*\w", README.read_text())
    assert len(paths) >= 5
    assert not [path for path in set(paths) if not (ROOT / path).exists()]


def test_readme_extras_exist():
    extras = set(re.findall(r"batchfit\[(\w+)\]", README.read_text()))
    pyproject = (ROOT / "pyproject.toml").read_text()
    declared = pyproject.split("[project.optional-dependencies]")[1].split("\n[")[0]
    assert extras and not [e for e in extras if not re.search(rf"^{e} = ", declared, re.M)]


def test_the_readme_examples_are_found():
    """The parsing above sees the blocks: a change of fence style must not empty the tests."""
    blocks = _blocks()
    python = [block for block in blocks if block.language == "python"]
    assert len(python) >= 10
    not_run = [block for block in python if block.marker and block.marker[0] == "not run"]
    assert len(not_run) <= 3, [block.line for block in not_run]
    batchfit = [c for c in _commands() if any(w[0] == "batchfit" for w in _pipeline(c.text))]
    assert len(batchfit) >= 25
    continued = [c for c in _commands() if "--batch-sizes 8,16,32,64,128,256,512,1024" in c.text]
    assert continued and continued[0].text.startswith("batchfit sweep --example digits")
    heredocs = [c.stdin for c in _commands() if c.stdin]
    assert heredocs and "throughput_png" in heredocs[0]


def test_pipeline_takes_off_prefixes_pipes_and_redirections():
    line = 'COLUMNS=100 batchfit diagnose runs/x --json > out.json | python -c "print(1)"'
    assert _pipeline(line) == [
        ["batchfit", "diagnose", "runs/x", "--json"],
        ["python", "-c", "print(1)"],
    ]
    assert _pipeline("python - <<'EOF'") == [["python", "-"]]


def test_a_renamed_flag_fails_the_check():
    with pytest.raises(AssertionError, match="does not parse"):
        _check_batchfit(["train", "--example", "digits", "--no-such-flag"], (), "here")
    with pytest.raises(AssertionError):  # the shown error is not the parser's
        _check_batchfit(["train", "--bogus"], (ERROR_PREFIX + "something else",), "here")


def test_the_readme_range_test_of_your_own_model_prints_the_numbers_it_shows():
    # The block builds its model from torch's global generator, which torch seeds at random
    # in each new process: whatever state the generator is in, it prints the README's line.
    import contextlib
    import io

    import torch

    from batchfit import load_example, lr_range_test

    blocks = _blocks()
    index = next(
        i for i, b in enumerate(blocks) if b.language == "python" and "# Your own model" in b.text
    )
    code = blocks[index].text
    own = code[code.index("# Your own model") : code.index("\nspeed = ")]
    shown = blocks[index + 1].text.splitlines()[2]
    assert shown == "0.187 True"
    printed = []
    for state in (0, 4):  # two states that, unseeded, gave 0.187 and 0.236
        out = io.StringIO()
        with torch.random.fork_rng(), contextlib.redirect_stdout(out):
            torch.manual_seed(state)
            names = {"torch": torch, "task": load_example("digits"), "lr_range_test": lr_range_test}
            exec(own, names)
        printed.append(out.getvalue().strip())
    assert printed == [shown, shown]
