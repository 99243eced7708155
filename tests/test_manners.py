"""Library manners: messages go through `logging` (shown by elbox's own handler unless a program routes them to its
handlers), and optional dependencies are extras whose absence is one clear error naming the pip line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib

import elbox
from elbox.core import log
from elbox.core.errors import ElboxError
from elbox.core.extras import EXTRAS, require

ROOT = Path(__file__).resolve().parents[1]


def points(n: int = 200) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)


@pytest.fixture
def restore_logging():
    yield
    log.LIBRARY.handlers[:] = [log.DEFAULT_HANDLER]
    log.LIBRARY.propagate = False
    log.LIBRARY.setLevel(logging.INFO)


def test_training_messages_are_log_records_shown_on_stderr_by_default(capsys, restore_logging):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log.LIBRARY.addHandler(handler)
    elbox.fit("gaussian", points(), progress=False)
    err = capsys.readouterr().err
    assert any(r.name == "elbox.training.workflows" and r.getMessage().startswith("training gaussian") for r in records)
    assert "elbox: training gaussian" in err  # the default handler: one line, "elbox: ..."
    log.LIBRARY.setLevel(logging.WARNING)  # a program that wants quiet
    elbox.fit("gaussian", points(), progress=False)
    assert capsys.readouterr().err == ""


def test_a_program_can_take_the_messages_into_its_own_logging(caplog, capsys, restore_logging):
    log.use_root_handlers()
    with caplog.at_level(logging.INFO):
        elbox.fit("gaussian", points(), progress=False)
    assert any(r.name.startswith("elbox.") and "training gaussian" in r.getMessage() for r in caplog.records)
    assert "elbox: training" not in capsys.readouterr().err  # elbox's own handler is gone


def test_a_warning_is_one_line_with_its_prefix(capsys, restore_logging):
    logging.getLogger("elbox.present.run_files").warning("metrics.jsonl line 3 is damaged; skipped")
    assert capsys.readouterr().err == "elbox: warning: metrics.jsonl line 3 is damaged; skipped\n"


def test_the_extras_in_pyproject_are_the_ones_elbox_names():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for module, extra in EXTRAS.items():
        assert any(requirement.startswith(module) for requirement in extras[extra]), (module, extra)
        assert not any(requirement.startswith(module) for requirement in project["dependencies"]), module


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_a_missing_extra_is_one_error_with_the_pip_line(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # import then raises ImportError, as when it is not installed
    with pytest.raises(
        ElboxError, match=rf"needs {module}, which is not installed: pip install 'elbox\[{EXTRAS[module]}\]'"
    ):
        require(module, "this feature")


def test_reading_a_table_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    table = tmp_path / "rows.csv"
    table.write_text("a,b\n1,2\n3,4\n")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ElboxError, match=r"reading a table .* pip install 'elbox\[tables\]'"):
        elbox.fit("gaussian", str(table))


def test_drawing_without_matplotlib_says_what_to_install(monkeypatch):
    from elbox.io.figures import curves_png

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ElboxError, match=r"pip install 'elbox\[report\]'"):
        curves_png([], 1.0)
