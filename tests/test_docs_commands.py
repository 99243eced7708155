"""Every documented example runs: each command line of the ```bash blocks of README.md and docs/*.md, and each
```python block of docs/*.md (README's "## Python" snippet is tests/test_readme_python.py's), on small data this
test writes, so a documented command can never fail unnoticed.

A file's commands run in order, in one fresh working directory (later commands read the run directories earlier ones
wrote), in this process through `elbox.cli.main` (torchrun lines as a subprocess). Each command is one test id,
FILE:LINE. Commands run as documented, with quick options appended: argparse takes an option's last value, so these
only shrink the work (epochs, examples, samples) and a renamed or removed documented option still fails. Optional
parts written in square brackets and trailing `# comments` are left out; a line that names a placeholder (HOST,
`...`) or needs other machines is skipped with its reason, listed below.
"""

from __future__ import annotations

import contextlib
import io
import json
import linecache
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Appended to each command (argparse takes the last value of an option): the same command on less work.
QUICK = {
    "train": ["--epochs", "1", "--limit-train", "256", "--val-limit", "128", "--no-samples", "--no-progress"],
    "evaluate": ["--limit", "16"],
    "tighten": ["--limit", "3", "--steps", "3", "--refit-epochs", "1", "--iw-samples", "10", "--elbo-samples", "4"],
    "sample": ["--n", "4"],
    "score": ["--iw-samples", "10", "--reference-limit", "8"],
    "ood": ["--limit", "8", "--iw-samples", "2", "--bootstrap", "5", "--regret-steps", "2"],
    "encode": [],
    "reconstruct": [],
    "report": [],
}
QUICK_DIFFUSION_SAMPLE = ["--steps", "4"]  # `elbox sample` of a diffusion run: 4 denoising steps, not 256

# The lines of ```bash blocks that are not elbox commands: the scripts CI and setup run (each is tested to exist).
SETUP_LINE = re.compile(r"^(source \.venv/bin/activate|\./scripts/\S+\.sh)$")
PLACEHOLDERS = ("HOST", "...", "…")
SECONDS_PER_COMMAND = 300


# -- extraction ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DocLine:
    path: Path
    line: int  # 1-based, where the command starts
    text: str  # as run: continuations joined, comments and [optional parts] left out

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text)


def fenced_blocks(path: Path, language: str) -> list[tuple[int, list[str]]]:
    """The ```LANGUAGE blocks of a Markdown file: (line number of the block's first line, its lines)."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if current is None:
            if line.strip() == f"```{language}":
                current, start = [], number + 1
        elif line.strip() == "```":
            blocks.append((start, current))
            current = None
        else:
            current.append(line)
    assert current is None, f"{path}: an unclosed ```{language} block"
    return blocks


def without_optional_parts(text: str) -> str:
    """Drop a trailing `# comment` and the optional parts written in square brackets (nested ones too)."""
    text = re.split(r"(?:^|\s)#", text, maxsplit=1)[0]
    while True:
        shorter = re.sub(r"\s*\[[^\[\]]*\]", "", text)
        if shorter == text:
            return " ".join(text.split())
        text = shorter


def bash_lines(path: Path) -> list[DocLine]:
    """Every non-comment line of the file's ```bash blocks, backslash continuations joined."""
    lines = []
    for start, block in fenced_blocks(path, "bash"):
        pending, first = "", None
        for offset, raw in enumerate(block):
            if first is None:
                first = start + offset
            if raw.rstrip().endswith("\\"):
                pending += raw.rstrip()[:-1] + " "
                continue
            text = without_optional_parts(pending + raw)
            if text:
                lines.append(DocLine(path, first, text))
            pending, first = "", None
        assert not pending, f"{path}:{first}: a continuation line ends its block"
    return lines


def classify(line: DocLine) -> str:
    """'elbox', 'torchrun', 'setup', or 'unknown' (a documented line this test cannot run: a test fails)."""
    first = line.words[0] if line.words else ""
    if first in ("elbox", "torchrun"):
        return first
    if SETUP_LINE.match(line.text):
        return "setup"
    return "unknown"


def skip_reason(line: DocLine) -> str | None:
    """Why a command cannot run here, or None."""
    named = [p for p in PLACEHOLDERS if any(p in word for word in line.words)]
    if named:
        return f"names placeholders ({', '.join(named)}): not a runnable command as written"
    if line.words[0] == "torchrun" and "--standalone" not in line.words:
        return "torchrun across machines (no --standalone): needs other machines"
    return None


ALL_LINES = {path: bash_lines(path) for path in DOC_FILES}
COMMANDS = {
    path: [line for line in lines if classify(line) in ("elbox", "torchrun")] for path, lines in ALL_LINES.items()
}
SETUP_LINES = [line for lines in ALL_LINES.values() for line in lines if classify(line) == "setup"]
UNKNOWN_LINES = [line for lines in ALL_LINES.values() for line in lines if classify(line) == "unknown"]


def command_params() -> list:
    params = []
    for lines in COMMANDS.values():
        for line in lines:
            reason = skip_reason(line)
            marks = [pytest.mark.skip(reason=f"{line.text!r} {reason}")] if reason else []
            params.append(pytest.param(line, id=line.id, marks=marks))
    return params


def readme_python_section_start(text: str) -> int:
    """The line number of README's "## Python" heading (its first ```python block is tests/test_readme_python.py's)."""
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() == "## Python":
            return number
    return -1


def python_blocks() -> list:
    blocks = []
    for path in DOC_FILES:
        found = fenced_blocks(path, "python")
        if path.name == "README.md":
            section = readme_python_section_start(path.read_text())
            covered = next((start for start, _ in found if start > section), None) if section > 0 else None
            found = [(start, block) for start, block in found if start != covered]
        blocks += [
            pytest.param(path, start, "\n".join(block), id=f"{path.relative_to(ROOT)}:{start}")
            for start, block in found
        ]
    return blocks


# -- the data the documented commands name ----------------------------------------------------------------------


def write_user_data(directory: Path) -> None:
    """Small files under the names the documented commands use: my_images/ (grey PNGs of 36 x 40 pixels in two
    subfolders, so that `--image-size 32` resizes them; more than one batch of 128 after the 10 % held out),
    table.csv (numeric columns a, b, c and one more), images.npy and digits.npy (uint8 [8, 28, 28])."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(160):
        folder = directory / "my_images" / ("shirts" if i % 2 else "shoes")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (40, 36), dtype=np.uint8)  # height 40, width 36
        Image.fromarray(pixels, mode="L").save(folder / f"{i:03d}.png")
    n = 300
    a = rng.normal(0, 1, n)
    b = 2 * a + rng.normal(0, 0.5, n)
    c = rng.normal(5, 3, n)
    d = rng.normal(0, 1, n)
    rows = "\n".join(f"{x:.6f},{y:.6f},{z:.6f},{w:.6f}" for x, y, z, w in zip(a, b, c, d))
    (directory / "table.csv").write_text("a,b,c,d\n" + rows + "\n")
    np.save(directory / "images.npy", rng.integers(0, 256, (8, 28, 28), dtype=np.uint8))
    np.save(directory / "digits.npy", rng.integers(0, 256, (8, 28, 28), dtype=np.uint8))


# -- running ------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    argv: list[str]
    code: int | None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0

    def failure(self) -> str:
        return (
            f"`{shlex.join(self.argv)}` exited {self.code} after {self.seconds:.1f} s\n"
            f"--- stderr (end) ---\n{self.stderr[-4000:]}\n--- stdout (end) ---\n{self.stdout[-2000:]}"
        )


def is_diffusion_run(run_dir: Path) -> bool:
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return "diffusion" in json.dumps(config.get("model", config))


def quick_argv(words: list[str], cwd: Path) -> list[str]:
    """The documented words (without the leading `elbox`) with this test's quick options appended."""
    argv = list(words)
    command = argv[0]
    assert command in QUICK, f"no quick options for `elbox {command}`: add them to QUICK"
    argv += QUICK[command]
    if command == "sample" and is_diffusion_run(cwd / argv[1]):
        argv += QUICK_DIFFUSION_SAMPLE
    return argv


def run_in_process(argv: list[str]) -> Result:
    """`elbox ARGV` through elbox.cli.main, its output captured; an escaping exception is a failure (a traceback)."""
    from elbox.cli.main import main

    out, err = io.StringIO(), io.StringIO()

    def hang(signum, frame):
        raise TimeoutError(f"ran longer than {SECONDS_PER_COMMAND} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(SECONDS_PER_COMMAND)
    began = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    except BaseException:  # noqa: BLE001 (recorded: the test of this command shows it)
        code = None
        err.write(traceback.format_exc())
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return Result(["elbox", *argv], code, out.getvalue(), err.getvalue(), time.perf_counter() - began)


def run_torchrun(words: list[str], cwd: Path) -> Result:
    """A standalone torchrun line as a subprocess (the venv's torch.distributed.run), quick options appended to the
    elbox command it starts."""
    assert words[0] == "torchrun" and "-m" in words and words[words.index("-m") + 1] == "elbox", words
    elbox_at = words.index("-m") + 2
    argv = [sys.executable, "-m", "torch.distributed.run", *words[1:elbox_at], *quick_argv(words[elbox_at:], cwd)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    began, stderr_before = time.perf_counter(), ""
    for attempt in (1, 2):
        try:
            done = subprocess.run(
                argv, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=SECONDS_PER_COMMAND
            )
            code, stdout, stderr = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as e:
            code, stdout = None, str(e.stdout or "")
            stderr = f"{e.stderr or ''}\ntimed out after {SECONDS_PER_COMMAND} s"
        out = words[words.index("--out") + 1] if "--out" in words else None
        if code == 0 or attempt == 2 or out is None or (cwd / out / "model.safetensors").exists():
            break
        # once more, as tests/test_distributed.py does: torchrun's loopback rendezvous can fail before any training
        stderr_before = f"--- first attempt (exit {code}) ---\n{stderr[-2000:]}\n--- second attempt ---\n"
    return Result(["torchrun", *argv[3:]], code, stdout, stderr_before + stderr, time.perf_counter() - began)


@dataclass
class FileRuns:
    """A documentation file's commands, run in order in one working directory, the first time one is asked for."""

    directory: Path
    results: dict[str, Result] = field(default_factory=dict)

    def run(self, path: Path) -> None:
        write_user_data(self.directory)
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(self.directory)
            for line in COMMANDS[path]:
                if skip_reason(line):
                    continue
                words = line.words
                try:
                    if words[0] == "torchrun":
                        self.results[line.id] = run_torchrun(words, self.directory)
                    else:
                        self.results[line.id] = run_in_process(quick_argv(words[1:], self.directory))
                except Exception:  # noqa: BLE001 (this test could not run it: that command's test shows why)
                    self.results[line.id] = Result(words, None, "", traceback.format_exc())


@pytest.fixture(scope="module")
def doc_runs(tmp_path_factory):
    """One FileRuns per documentation file, each run once (in order) when its first command's test asks for it."""
    runs: dict[Path, FileRuns] = {}

    def get(path: Path) -> FileRuns:
        if path not in runs:
            runs[path] = FileRuns(tmp_path_factory.mktemp(path.stem))
            runs[path].run(path)
        return runs[path]

    yield get
    timings = [(line_id, r.seconds) for fr in runs.values() for line_id, r in fr.results.items()]
    print("\n".join(f"{seconds:7.1f} s  {line_id}" for line_id, seconds in timings))


# -- tests ----------------------------------------------------------------------------------------------------------


def test_every_bash_line_is_a_command_or_a_setup_script():
    """A documented ```bash line this test cannot run would otherwise go untested."""
    assert not UNKNOWN_LINES, [f"{line.id}: {line.text}" for line in UNKNOWN_LINES]


def test_the_documented_commands_are_found():
    readme, guide = ROOT / "README.md", ROOT / "docs" / "guide.md"
    assert len(COMMANDS[readme]) >= 3 and len(COMMANDS[guide]) >= 10
    subcommands = {line.words[1] for line in COMMANDS[readme] + COMMANDS[guide] if line.words[0] == "elbox"}
    assert subcommands >= {"train", "evaluate"}, subcommands
    for lines in COMMANDS.values():
        for line in lines:
            assert "[" not in line.text and "#" not in line.text, line  # optional parts and comments are left out
    # README's "## Python" snippet is tests/test_readme_python.py's; the guide's "## Using the library" block is here
    assert any(param.values[0].name == "guide.md" for param in python_blocks())


def test_the_extraction_joins_continuations_and_leaves_out_optional_parts(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "text\n```bash\nsource .venv/bin/activate\n# a comment line\n"
        "elbox train --model vae \\\n    --out runs/x   # [--epochs N]\n"
        "      # [--hidden-dims H [H ...]]\n"
        "elbox evaluate runs/x [--limit N] --iw-samples 1 [--json FILE [--overwrite]]  # trailing\n"
        "```\n```python\nprint(1)\n```\n"
    )
    lines = bash_lines(doc)
    assert [(line.line, line.text, classify(line)) for line in lines] == [
        (3, "source .venv/bin/activate", "setup"),
        (5, "elbox train --model vae --out runs/x", "elbox"),
        (8, "elbox evaluate runs/x --iw-samples 1", "elbox"),
    ]
    assert fenced_blocks(doc, "python") == [(11, ["print(1)"])]


@pytest.mark.parametrize("line", command_params())
def test_documented_command_runs(line: DocLine, doc_runs):
    result = doc_runs(line.path).results[line.id]
    assert result.code == 0, f"{line.id}: the documented command `{line.text}` failed:\n{result.failure()}"


def test_the_setup_scripts_the_docs_name_exist_and_are_executable():
    """`source .venv/bin/activate` and `./scripts/*.sh` are what setup and CI run: not run here, but they must be
    there to run."""
    scripts = sorted({line.text.split()[0] for line in SETUP_LINES if line.text.startswith("./scripts/")})
    assert "./scripts/main.sh" in scripts and "./scripts/test.sh" in scripts, scripts
    for script in scripts:
        path = ROOT / script
        assert path.is_file() and os.access(path, os.X_OK), f"{script} (named in the docs) is not an executable file"
    activations = [line for line in SETUP_LINES if line.text.startswith("source ")]
    assert activations, "the docs no longer say to activate the virtual environment"
    for line in activations:
        assert line.text == "source .venv/bin/activate", line  # what scripts/setup.sh creates
    assert ".venv" in (ROOT / "scripts" / "setup.sh").read_text()


def my_uint8_images():
    """The `my_uint8_images` the guide's snippet assumes: 8-bit images [N, 1, 28, 28] (Fashion-MNIST's first 300)."""
    from elbox.data import load_split

    images, _ = load_split("fashion-mnist", "train")
    return images[:300]


@pytest.mark.parametrize("path, start, code", python_blocks())
def test_documented_python_block_runs(path: Path, start: int, code: str, tmp_path, monkeypatch, capsys):
    """A ```python block of the docs runs as written, in a fresh directory, with quick settings: elbox.fit trains one
    epoch on 256 images, elbox.evaluate takes 16 examples (keyword values override the block's, like the options
    appended to a command)."""
    import elbox

    monkeypatch.chdir(tmp_path)
    fit, evaluate = elbox.fit, elbox.evaluate

    def quick_fit(*args, **options):
        return fit(
            *args, **{**options, "epochs": 1, "limit_train": 256, "val_limit": 128, "samples": False, "progress": False}
        )

    def quick_evaluate(*args, **options):
        return evaluate(*args, **{**options, "limit": 16})

    monkeypatch.setattr(elbox, "fit", quick_fit)
    monkeypatch.setattr(elbox, "evaluate", quick_evaluate)
    namespace: dict = {"__name__": "__docs__"}
    if "my_uint8_images" in code:
        namespace["my_uint8_images"] = my_uint8_images()
    name = f"{path.relative_to(ROOT)}, the block from line {start}"
    linecache.cache[name] = (len(code), None, code.splitlines(keepends=True), name)  # tracebacks show the block's line
    exec(compile(code, name, "exec"), namespace)  # noqa: S102 (the docs, as written)
