"""Hostile outputs and command-line values (issue 16): elbox writes only regular files, refuses every other path
with one line before any work, never loses the previous file, and refuses numbers that do not fit the machine."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli_expecting_error, snapshot

import elbox
from elbox.cli.main import build_parser, main
from elbox.core.errors import ElboxError
from elbox.core.options import MAX_SEED as SEED_MAX
from elbox.data import load_split
from elbox.io import atomic
from elbox.io.atomic import atomic_write_bytes

PROC_PATH = Path("/proc/elbox-test.png")  # a location nobody can create files in, root included


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "vae"
    elbox.fit(
        "vae",
        "synthetic",
        out=out,
        epochs=1,
        limit_train=200,
        batch_size=50,
        latent_dim=2,
        hidden_dims=[16],
        progress=False,
        verbose=False,
    )
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "x.npy"
    np.save(path, load_split("synthetic", "test")[0][:4].numpy())
    return path


def commands(run: Path, images: Path) -> dict[str, list]:
    """Every command with a file output, cheap settings, and the flag that names the output last."""
    return {
        "sample": ["sample", run, "--n", "4", "--no-progress", "--out"],
        "reconstruct": ["reconstruct", run, "--n", "4", "--no-progress", "--out"],
        "score": ["score", run, "--input", images, "--iw-samples", "2", "--no-progress", "--out"],
        "encode": ["encode", run, "--input", images, "--no-progress", "--out"],
        "report": ["report", run, "--no-progress", "--out"],
        "evaluate": ["evaluate", run, "--iw-samples", "2", "--limit", "8", "--no-progress", "--json"],
        "tighten": [
            "tighten",
            run,
            "--limit",
            "4",
            "--steps",
            "2",
            "--refit-epochs",
            "0",
            "--iw-samples",
            "2",
            "--elbo-samples",
            "2",
            "--no-progress",
            "--json",
        ],
    }


SUFFIX = {
    "sample": ".png",
    "reconstruct": ".png",
    "score": ".csv",
    "encode": ".npz",
    "report": ".html",
    "evaluate": ".json",
    "tighten": ".json",
}


def hostile(kind: str, case: Path, suffix: str) -> tuple[Path, str]:
    """A hostile output path of `kind` made under the folder `case`, and what the error must say."""
    case.mkdir()
    if kind == "symlink":
        (case / "target.txt").write_bytes(b"the user's file")
        (case / f"out{suffix}").symlink_to(case / "target.txt")
        return case / f"out{suffix}", "symbolic link"
    if kind == "device":  # a clone of /dev/null: written through, nothing would show; replaced, its kind changes
        os.mknod(case / f"out{suffix}", 0o666 | 0o020000, os.makedev(1, 3))
        return case / f"out{suffix}", "character device"
    if kind == "fifo":  # opening it for writing would block forever
        os.mkfifo(case / f"out{suffix}")
        return case / f"out{suffix}", "FIFO"
    if kind == "directory":
        (case / f"out{suffix}").mkdir()
        (case / f"out{suffix}" / "keep.txt").write_text("mine")
        return case / f"out{suffix}", "a directory"
    if kind == "missing-parent":
        return case / "no-such-dir" / f"out{suffix}", "does not exist"
    if kind == "long-name":
        return case / ("n" * 300 + suffix), "File name too long"
    if kind == "parent-is-file":
        (case / "file").write_text("mine")
        return case / "file" / f"out{suffix}", "Not a directory"
    raise AssertionError(kind)


@pytest.fixture
def no_work(monkeypatch):
    """Every command's work fails the test if it starts: a refusal must come first."""
    from elbox.cli import commands as cli

    def work(*args, **kwargs):
        raise AssertionError("the command started its work before refusing the output path")

    for name in ("load_run", "write_report", "tighten_run"):
        monkeypatch.setattr(cli, name, work)
    monkeypatch.setattr(elbox, "evaluate", work)


KINDS = ["symlink", "device", "fifo", "directory", "missing-parent", "long-name", "parent-is-file"]


@pytest.mark.parametrize("command", list(SUFFIX))
def test_hostile_output_paths_are_refused_before_any_work(run_dir, images, tmp_path, no_work, command):
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    argv = commands(run_dir, images)[command]
    for kind in KINDS:
        path, message = hostile(kind, tmp_path / kind, SUFFIX[command])
        # seconds=20: refused at parse time, so a hang (a FIFO opened) or a full run would show
        line = run_cli_expecting_error([*argv, path], untouched=[tmp_path / kind, run_dir], seconds=20, match=message)
        assert "cannot write" in line, line
    assert (tmp_path / "symlink" / "target.txt").read_bytes() == b"the user's file"
    assert not (tmp_path / "missing-parent" / "no-such-dir").exists()


@pytest.mark.parametrize("command", list(SUFFIX))
def test_a_read_only_location_is_refused(run_dir, images, no_work, command):
    path = PROC_PATH.with_suffix(SUFFIX[command])
    run_cli_expecting_error(
        [*commands(run_dir, images)[command], path],
        untouched=[run_dir],
        seconds=20,
        match="no file can be created in /proc",
    )
    assert not path.exists()


@pytest.mark.parametrize("command", list(SUFFIX))
def test_a_full_disk_keeps_the_previous_file_and_leaves_no_temporary(run_dir, images, tmp_path, monkeypatch, command):
    out = tmp_path / f"out{SUFFIX[command]}"
    out.write_bytes(b"the previous output")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", full)
    run_cli_expecting_error(
        [*commands(run_dir, images)[command], out, "--overwrite"],
        untouched=[tmp_path, run_dir],
        match=f"cannot write {out}: No space left on device",
    )
    assert out.read_bytes() == b"the previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no .tmp left, no report files beside it


def test_report_refuses_a_hostile_markdown_path_beside_the_html(run_dir, tmp_path, no_work):
    (tmp_path / "target.md").write_text("mine")
    (tmp_path / "page.md").symlink_to(tmp_path / "target.md")
    run_cli_expecting_error(
        ["report", run_dir, "--out", tmp_path / "page.html"],
        untouched=[tmp_path, run_dir],
        seconds=20,
        match="page.md: it is a symbolic link",
    )
    run_cli_expecting_error(
        ["report", run_dir, "--out", tmp_path / "page.md"], untouched=[tmp_path, run_dir], seconds=20, match="Markdown"
    )


def test_default_outputs_in_the_run_dir_are_checked_too(run_dir, tmp_path):
    """A hostile path where a command writes by default (RUN_DIR/samples.png) is refused at write time."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "samples.png").unlink()
    (run / "samples.png").symlink_to(tmp_path / "elsewhere.png")
    run_cli_expecting_error(["sample", run, "--n", "4"], untouched=[tmp_path], match="symbolic link")
    assert not (tmp_path / "elsewhere.png").exists()


def test_outputs_still_replace_a_regular_file(run_dir, tmp_path):
    out = tmp_path / "s.png"
    out.write_bytes(b"old")
    assert main(["sample", str(run_dir), "--n", "4", "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes().startswith(b"\x89PNG") and os.listdir(tmp_path) == ["s.png"]


def test_atomic_write_refuses_links_and_keeps_the_previous_file(tmp_path, monkeypatch):
    (tmp_path / "target").write_bytes(b"target")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(ElboxError, match="symbolic link"):
        atomic_write_bytes(tmp_path / "link", b"new")
    assert (
        os.readlink(tmp_path / "link") == str(tmp_path / "target") and (tmp_path / "target").read_bytes() == b"target"
    )
    # run-directory files: missing folders are created; a name near the limit still fits its temporary file
    deep = tmp_path / "a" / "b" / ("x" * 250)
    atomic_write_bytes(deep, b"ok")
    assert deep.read_bytes() == b"ok" and os.listdir(deep.parent) == [deep.name]

    def fail(fd):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(atomic.os, "fsync", fail)
    with pytest.raises(ElboxError, match="Read-only file system"):
        atomic_write_bytes(deep, b"new")
    assert deep.read_bytes() == b"ok" and os.listdir(deep.parent) == [deep.name]


def test_write_errors_are_short_for_huge_paths(tmp_path):
    with pytest.raises(ElboxError) as e:
        atomic_write_bytes(tmp_path / ("y" * 5000), b"x")
    assert len(str(e.value)) < 300 and "File name too long" in str(e.value)


# -- command-line values --------------------------------------------------------------------------------------

# (command line before the option, option, smallest, largest): every numeric option of the non-train commands
INTEGERS = [
    (["evaluate", "RUN"], "--iw-samples", 1, 100_000),
    (["evaluate", "RUN"], "--elbo-samples", 1, 10_000),
    (["evaluate", "RUN"], "--limit", 1, 10**9),
    (["evaluate", "RUN"], "--batch-size", 1, 10_000),
    (["sample", "RUN"], "--n", 1, 10_000),
    (["sample", "RUN"], "--steps", 1, 100_000),
    (["score", "RUN", "--input", "x.npy"], "--iw-samples", 1, 100_000),
    (["score", "RUN", "--input", "x.npy"], "--elbo-samples", 1, 10_000),
    (["score", "RUN", "--input", "x.npy"], "--batch-size", 1, 10_000),
    (["encode", "RUN", "--input", "x.npy", "--out", "f.npz"], "--batch-size", 1, 10_000),
    (["reconstruct", "RUN"], "--n", 1, 10_000),
    (["tighten", "RUN"], "--limit", 1, 10_000),
    (["tighten", "RUN"], "--steps", 1, 100_000),
    (["tighten", "RUN"], "--refit-epochs", 0, 1000),
    (["tighten", "RUN"], "--iw-samples", 1, 100_000),
    (["tighten", "RUN"], "--elbo-samples", 1, 10_000),
]
INTEGERS += [
    ([command, "RUN", *extra], "--seed", 0, SEED_MAX)
    for command, extra in [
        ("evaluate", []),
        ("sample", []),
        ("score", ["--input", "x.npy"]),
        ("encode", ["--input", "x.npy", "--out", "f.npz"]),
        ("report", []),
        ("reconstruct", []),
        ("tighten", []),
    ]
]
INTEGERS += [
    ([command, "RUN", *extra], "--threads", 1, 1024)
    for command, extra in [
        ("evaluate", []),
        ("sample", []),
        ("score", ["--input", "x.npy"]),
        ("encode", ["--input", "x.npy", "--out", "f.npz"]),
        ("report", []),
        ("reconstruct", []),
        ("tighten", []),
    ]
]
SCORE_METHOD, OOD = ["score", "RUN", "--input", "x.npy"], ["ood", "RUN", "--outliers", "x.npy"]
INTEGERS += [
    (SCORE_METHOD, "--reference-limit", 1, 10**9),
    (SCORE_METHOD, "--llr-k", 0, 100),
    (SCORE_METHOD, "--regret-steps", 1, 100_000),
]
INTEGERS += [
    (OOD, flag, low, high)
    for flag, low, high in [
        ("--iw-samples", 1, 100_000),
        ("--llr-k", 0, 100),
        ("--regret-steps", 1, 100_000),
        ("--binarizations", 1, 10_000),
        ("--limit", 1, 10**9),
        ("--bootstrap", 1, 100_000),
        ("--batch-size", 1, 10_000),
        ("--seed", 0, SEED_MAX),
        ("--threads", 1, 1024),
    ]
]
REALS = [(["sample", "RUN"], "--temperature", 0, 100), (["tighten", "RUN"], "--lr", 0, 10)]


@pytest.mark.parametrize("before, flag, low, high", INTEGERS, ids=[f"{b[0]}{f}" for b, f, _, _ in INTEGERS])
def test_integer_options_have_a_range(tmp_path, before, flag, low, high):
    before = [str(tmp_path / "run") if a == "RUN" else a for a in before]
    for bad in [low - 1, high + 1, "1e23", "nan", "2.5", "abc", "9" * 5000, 2**64]:
        line = run_cli_expecting_error(
            [*before, f"{flag}={bad}"], untouched=[tmp_path], seconds=10, match=f"argument {flag}"
        )
        if bad in (low - 1, high + 1):
            assert f"must be a whole number between {low} and {high}" in line, line
        else:  # not a whole number, or one beyond 64 bits
            assert "must be a whole number" in line or "must fit a 64-bit integer" in line, line
        assert "--help" in line, line
    for good in (low, high):  # the ends of the range parse
        value = getattr(build_parser().parse_args([*before, flag, str(good)]), flag[2:].replace("-", "_"))
        assert value in (good, [good])


@pytest.mark.parametrize("before, flag, above, high", REALS, ids=[f"{b[0]}{f}" for b, f, _, _ in REALS])
def test_real_options_have_a_range(tmp_path, before, flag, above, high):
    before = [str(tmp_path / "run") if a == "RUN" else a for a in before]
    for bad in [above, -1, high * 1.01, "1e308", "1e400", "nan", "inf", "-inf", "abc"]:
        line = run_cli_expecting_error(
            [*before, f"{flag}={bad}"], untouched=[tmp_path], seconds=10, match=f"argument {flag}"
        )
        if bad in ("1e400", "nan", "inf", "-inf", "abc"):  # not a finite number
            assert "must be finite" in line or "must be a number" in line, line
        else:
            assert f"must be a number > {above:g} and <= {high:g}" in line, line
    value = getattr(build_parser().parse_args([*before, flag, str(high)]), flag[2:])
    assert value in (high, [high])


def test_every_numeric_option_is_in_the_lists_above():
    """A numeric option added later without a range (type=int or float) fails here."""
    parser = build_parser()
    listed = {(b[0], f) for b, f, _, _ in INTEGERS + REALS}
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.type is not None and action.option_strings:
                assert action.type not in (int, float), (name, action.option_strings)
                numeric = action.type.__name__ in ("int", "float")
                assert not numeric or (name, action.option_strings[0]) in listed, (name, action.option_strings)


def test_train_threads_has_a_range(tmp_path):
    run_cli_expecting_error(
        ["train", "--out", tmp_path / "run", "--threads", "100000"],
        untouched=[tmp_path],
        seconds=10,
        match="argument --threads: must be a whole number between 1 and 1024",
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "RUN", "--bogus"], "unrecognized arguments: --bogus"),
        (["sample"], "the following arguments are required: run_dir"),
        (["encode", "RUN", "--input", "x.npy"], "the following arguments are required: --out"),
        (["evaluate", "RUN", "--split", "nope"], "argument --split: unknown value 'nope'"),
        (["evaluate", "RUN", "--device", "x" * 10_000], "argument --device: invalid choice"),
        (["frobnicate"], "argument COMMAND: invalid choice"),
        ([], "the following arguments are required: COMMAND"),
        (["train", "vae", "--bogus"], "unrecognized arguments: --bogus (see elbox train vae --help)"),
        (["train", "vae", "--latent-dim", "0", "--out", "OUT"], "argument --latent-dim"),
    ],
)
def test_argparse_errors_are_one_line(tmp_path, argv, message):
    argv = [str(tmp_path / "run") if a == "RUN" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    line = run_cli_expecting_error(argv, untouched=[tmp_path], seconds=10, match=message)
    assert "--help" in line


def test_usage_errors_exit_2_and_help_exits_0(capsys):
    assert main(["sample", "x", "--n", "0"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["sample", "--help"])
    assert e.value.code == 0 and "--temperature" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["train", "vae", "--help"])
    assert e.value.code == 0 and "--latent-dim" in capsys.readouterr().out


def test_snapshot_sees_what_a_replaced_device_would_be(tmp_path):
    """The check behind the hostile-path tests: replacing a device node by a file changes the snapshot."""
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    os.mknod(tmp_path / "dev", 0o666 | 0o020000, os.makedev(1, 3))
    before = snapshot(tmp_path)
    (tmp_path / "dev").unlink()
    (tmp_path / "dev").write_bytes(b"png")
    assert snapshot(tmp_path) != before


def test_every_error_line_is_short(monkeypatch):
    """main keeps any ElboxError to one short line, whoever wrote the message."""
    from elbox.cli import commands as cli

    def huge(*args, **kwargs):
        raise ElboxError("bad\n" + "x" * 100_000)

    monkeypatch.setattr(cli, "read_run_config", huge)
    line = run_cli_expecting_error(["sample", "RUN"], seconds=10, match="bad x")
    assert len(line) < 520
