"""The command line for a new user: --version, one-line errors with a "did you mean" for typos, defaults in --help,
one message per rule, and a start without torch for --help and --version."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
from conftest import run_cli_expecting_error

import elbox
from elbox.cli.main import build_parser, main, train_parser
from elbox.core.command_options import SPLITS
from elbox.models import MODELS


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"elbox {elbox.__version__}"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--model", "vea", "--out", "x"], "unknown model 'vea'; did you mean 'vae'?"),
        (["train", "vea", "--out", "x"], "unknown model 'vea'; did you mean 'vae'?"),
        (["evalute", "run"], "invalid choice: 'evalute'; did you mean 'evaluate'?"),
        (
            ["train", "--latnt-dim", "3", "--out", "x"],
            "unrecognized arguments: --latnt-dim; did you mean --latent-dim?",
        ),
        (["evaluate", "run", "--limt", "5"], "unrecognized arguments: --limt; did you mean --limit?"),
        (["--verison"], "unrecognized arguments: --verison; did you mean --version?"),
        (["evaluate", "run", "--split", "tset"], "argument --split: unknown value 'tset'; did you mean 'test'?"),
        (
            ["train", "--likelihood", "bernouli", "--out", "x"],
            "argument --likelihood: unknown value 'bernouli'; did you mean 'bernoulli'?",
        ),
    ],
)
def test_a_typo_gets_one_line_with_a_suggestion(tmp_path, capsys, argv, message):
    line = run_cli_expecting_error(argv, untouched=[tmp_path], seconds=30, match=message)
    assert "usage:" not in line
    assert "usage:" not in capsys.readouterr().err  # no usage block, on any stream


def test_no_suggestion_when_nothing_is_near(tmp_path):
    line = run_cli_expecting_error(
        ["train", "vae", "--bogus"], seconds=30, match="unrecognized arguments: --bogus (see"
    )
    assert "did you mean" not in line


def test_help_shows_every_default():
    """Every option with a default says it, once, as "(default: X)"; flags (off unless given) and options without a
    default need not."""
    parsers = {name: p for name, p in build_parser().commands.choices.items() if name != "train"}
    parsers.update({f"train {m}": train_parser(m, {})[0] for m in MODELS})
    checked = 0
    for name, parser in parsers.items():
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            flag = action.default is False and action.nargs == 0
            if action.default is not None and not flag:
                assert (action.help or "").count("(default: ") == 1, (name, action.option_strings[0], action.help)
                checked += 1
    assert checked > 150
    latent = next(a for a in train_parser("vae", {})[0]._actions if a.dest == "latent_dim")
    assert latent.help.endswith("(default: 32)")
    validation = next(a for a in train_parser("vae", {})[0]._actions if a.dest == "validation")
    assert "(default: none)" not in validation.help  # its own text explains the default: not said twice


@pytest.mark.parametrize(
    "command, rule",
    [(["train", "--out", "OUT"], "must be > 0"), (["tighten", "RUN"], "must be a number > 0 and <= 10")],
)
def test_one_rule_one_message(tmp_path, command, rule):
    """--lr 0, --lr -1, --lr=-1 and a negative number in exponent form break one rule: one message, echoing the
    value."""
    command = [str(tmp_path / "out") if a == "OUT" else str(tmp_path / "run") if a == "RUN" else a for a in command]
    for value in ("0", "-1", "-1e-3", "-.5"):
        for argv in ([*command, "--lr", value], [*command, f"--lr={value}"]):
            line = run_cli_expecting_error(argv, untouched=[tmp_path], seconds=30)
            assert line.startswith(f"elbox: error: argument --lr: {rule}, got {value} (see elbox "), line


def test_splits_agree_with_the_data_package():
    from elbox.data import SPLITS as data_splits

    assert SPLITS == data_splits


def python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout.strip()


def test_import_elbox_does_not_import_torch():
    assert python("import elbox, sys; print('torch' in sys.modules)") == "False"
    # the public names load on first use
    assert (
        python(
            "import sys; from elbox import fit, load, TrainConfig, ElboxError, MODELS; "
            "print('torch' in sys.modules, callable(fit), 'vae' in MODELS)"
        )
        == "True True True"
    )


@pytest.mark.parametrize(
    "argv, code", [(["--help"], 0), (["--version"], 0), (["evaluate", "--help"], 0), (["evalute", "run"], 2)]
)
def test_help_version_and_usage_errors_do_not_import_torch(argv, code):
    """`python -m elbox ARGV` run with -X importtime, which lists every module the process imports."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "elbox", *argv], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == code, done.stderr[-500:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert {"elbox.cli", "argparse"} <= imported and not {m for m in imported if m.split(".")[0] in ("torch", "numpy")}
