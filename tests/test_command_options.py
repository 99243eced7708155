"""Every command's options are declared once, on its dataclass (elbox.core.command_options): the command line is
generated from it, and the Python functions take their defaults from it."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest

import elbox
from elbox.cli.command_options import COMMANDS
from elbox.cli.main import build_parser
from elbox.core.command_options import (
    EncodeOptions,
    EvaluateOptions,
    OODOptions,
    SampleOptions,
    ScoreOptions,
    TightenOptions,
)
from elbox.core.options import MISSING, option_specs
from elbox.evaluation import detection, evaluator, inference, runs, tighten
from elbox.io.run_config import TrainConfig

PYTHON_FUNCTIONS = [  # (function, the options it shares with its command)
    (runs.evaluate, EvaluateOptions),
    (evaluator.evaluate, EvaluateOptions),
    (inference.sample, SampleOptions),
    (inference.sample_options, SampleOptions),
    (inference.score, ScoreOptions),
    (inference.score_with_stderr, ScoreOptions),
    (inference.encode, EncodeOptions),
    (detection.anomaly_scores, ScoreOptions),
    (detection.ood, OODOptions),
    (tighten.tighten_run, TightenOptions),
]


def as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize("function, options", PYTHON_FUNCTIONS, ids=lambda p: getattr(p, "__qualname__", ""))
def test_python_defaults_are_the_commands_defaults(function, options):
    fields = {spec.name: spec.default for spec in option_specs(options) if spec.default is not MISSING}
    shared = [p for p in inspect.signature(function).parameters.values() if p.name in fields]
    assert len(shared) >= 2, function  # the function does share the command's options
    for parameter in shared:
        assert as_list(parameter.default) == as_list(fields[parameter.name]), (function.__qualname__, parameter.name)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_line_is_its_dataclass(name):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[name]
    actions = {action.dest: action for action in sub._actions}
    for spec in option_specs(COMMANDS[name][2]):
        action = actions[spec.name]
        assert action.option_strings[0] == spec.flag
        assert action.required == (spec.default is MISSING), spec.name
        if spec.default is not MISSING:
            assert as_list(action.default) == as_list(spec.default), spec.name
    own = {"run_dir", "help", "overwrite", "device", "no_progress", "threads", "func"}
    assert set(actions) - own == {spec.name for spec in option_specs(COMMANDS[name][2])}


def test_a_list_option_without_a_default_may_be_given_twice(tmp_path):
    args = build_parser().parse_args(
        ["score", str(tmp_path), "--input", "x.npy", "--method", "likelihood", "--method", "llr", "complexity"]
    )
    assert args.method == ["likelihood", "llr", "complexity"]


def test_fit_takes_a_train_config_whose_fields_the_keywords_override():
    x = np.random.default_rng(0).normal(size=(200, 3)).astype(np.float32)
    run = elbox.fit(
        "gaussian", x, train=TrainConfig(seed=3, batch_size=64), batch_size=32, progress=False, verbose=False
    )
    assert run.config["train"]["seed"] == 3 and run.config["train"]["batch_size"] == 32
    with pytest.raises(elbox.ElboxError, match="train must be a TrainConfig, got dict"):
        elbox.fit("gaussian", x, train={"seed": 3})


def test_the_option_dataclasses_are_keyword_only_and_frozen_in_their_defaults():
    for options in (EvaluateOptions, SampleOptions, ScoreOptions, EncodeOptions, TightenOptions, OODOptions):
        for field in dataclasses.fields(options):
            assert field.kw_only, (options.__name__, field.name)
            assert field.default_factory is dataclasses.MISSING, (options.__name__, field.name)  # class attributes
