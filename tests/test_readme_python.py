"""The README's Python snippet runs as written: the first ```python block of its "## Python" section is executed in
a fresh working directory, so the README cannot drift from the API."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippet(text: str) -> str:
    """The first ```python block of the "## Python" section."""
    section = re.search(r"^## Python\n(.*?)(?=^## |\Z)", text, re.DOTALL | re.MULTILINE)
    assert section, "README.md has no '## Python' section"
    block = re.search(r"^```python\n(.*?)^```", section.group(1), re.DOTALL | re.MULTILINE)
    assert block, "the README's '## Python' section has no ```python block"
    return block.group(1)


def test_the_snippet_is_found_and_complete():
    code = python_snippet(README.read_text())
    assert code.startswith("import elbox") and "elbox.fit(" in code and "elbox.score(" in code
    assert "x, labels = " in code  # it says where x comes from


def test_the_readme_python_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = python_snippet(README.read_text())
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, "README.md (## Python)", "exec"), namespace)  # noqa: S102 (the README, as written)
    out = capsys.readouterr().out
    assert re.search(r"NLL \d+\.\d\d ± \d+\.\d\d nats \(IWAE-100\), ELBO -\d+\.\d\d", out), out
    result, values, estimate = namespace["result"], namespace["values"], namespace["estimate"]
    assert result["nll_iw"] <= -result["elbo"] + 4 * result["gap_elbo_iw_stderr"]  # IWAE-100 is the tighter bound
    assert (tmp_path / "runs" / "vae-py" / "model.safetensors").is_file()
    assert values.shape == (10,) and (values < 0).all() and estimate.startswith("IWAE-100 lower bound")
    assert namespace["features"]["mean"].shape == (10, namespace["run"].model.config.latent_dim)
    assert tuple(namespace["images"].shape) == (64, 1, 28, 28) and not namespace["images"].requires_grad
