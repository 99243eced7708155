"""Hostile input to elbox ood, elbox score --method, elbox.ood and elbox.anomaly_scores: every bad input is one line on
stderr naming the input and the problem, no traceback, and no user file replaced; odd but valid input (a method given
twice, one bootstrap resample, a background that was not perturbed) gives a sound result."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import two_tone_images

import elbox
from elbox.cli.main import main
from elbox.core.errors import ElboxError


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs of 8 x 8 images (a binary VAE, a diffusion model) and of a table (a Gaussian), and data files."""
    root = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    images = two_tone_images(rng, 160)
    np.save(root / "train.npy", images[:120])
    np.save(root / "inliers.npy", images[120:])
    np.save(root / "noise.npy", rng.integers(0, 256, (30, 8, 8), dtype=np.uint8))
    rows = rng.normal(0, 1, (200, 3))
    (root / "table.csv").write_text("a,b,c\n" + "\n".join(",".join(f"{v:.5f}" for v in r) for r in rows))
    (root / "table_out.csv").write_text("a,b,c\n" + "\n".join(",".join(f"{5 + v:.5f}" for v in r) for r in rows[:20]))
    quick = dict(epochs=1, batch_size=40, progress=False, verbose=False, samples=False)
    elbox.fit("vae", str(root / "train.npy"), out=root / "vae", latent_dim=2, hidden_dims=[16], **quick)
    elbox.fit("diffusion", str(root / "train.npy"), out=root / "diffusion", channels=[8], **quick)
    elbox.fit("gaussian", str(root / "table.csv"), out=root / "table", **quick)
    return root


def ood_command(runs, run: str, *argv: str, outliers: str = "noise.npy", json_name: str = "result.json") -> int:
    return main(
        [
            "ood",
            str(runs / run),
            "--outliers",
            str(runs / outliers),
            "--inliers",
            str(runs / "inliers.npy"),
            "--limit",
            "12",
            "--iw-samples",
            "2",
            "--bootstrap",
            "3",
            "--no-progress",
            "--threads",
            "1",
            "--json",
            str(runs / json_name),
            *argv,
        ]
    )


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("elbox: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- a set that is neither a split nor a file ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value, message",
    [
        (
            "--reference",
            "bogus",
            "--reference bogus: no such file or folder, nor a split of the run's data (train, "
            "validation, train-full, test)",
        ),
        ("--inliers", "Test", "--inliers Test: no such file or folder, nor a split of the run's data"),
        ("--inliers", "tset", "did you mean 'test'?"),
    ],
)
def test_a_set_that_is_neither_a_split_nor_a_path_is_named_with_the_splits(runs, capsys, option, value, message):
    code = ood_command(runs, "vae", option, value, json_name="never.json")
    assert code == 1 and message in one_error_line(capsys)
    assert not (runs / "never.json").exists() and not (runs / "never.png").exists()


def test_score_reference_that_is_neither_a_split_nor_a_path(runs, capsys, tmp_path):
    code = main(
        [
            "score",
            str(runs / "vae"),
            "--input",
            str(runs / "noise.npy"),
            "--method",
            "typicality",
            "--reference",
            "validaton",
            "--iw-samples",
            "2",
            "--no-progress",
            "--out",
            str(tmp_path / "s.csv"),
        ]
    )
    err = one_error_line(capsys)
    assert code == 1 and "--reference validaton: no such file or folder" in err and "did you mean 'validation'" in err


# -- methods given twice, as one string, or none --------------------------------------------------------------------


def test_methods_given_twice_add_up_and_each_is_scored_once(runs):
    assert (
        ood_command(runs, "vae", "--methods", "complexity", "likelihood", "--methods", "typicality", "complexity") == 0
    )
    result = json.loads((runs / "result.json").read_text())
    assert sorted(result["methods"]) == ["complexity", "likelihood", "typicality"]


def test_score_methods_given_twice_add_up_and_each_is_a_column_once(runs, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    assert (
        main(
            [
                "score",
                str(runs / "vae"),
                "--input",
                str(runs / "noise.npy"),
                "--method",
                "likelihood",
                "--method",
                "typicality",
                "likelihood",
                "--iw-samples",
                "2",
                "--reference-limit",
                "10",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    header = next(csv.reader(out.open()))
    assert [c for c in header if c.startswith(("anomaly_", "p_value_"))] == [
        "anomaly_likelihood",
        "p_value_likelihood",
        "anomaly_typicality",
        "p_value_typicality",
    ]
    assert capsys.readouterr().out.count("likelihood 0") <= 1


@pytest.mark.parametrize(
    "methods, expected", [("likelihood", ["likelihood"]), (["typicality", "typicality"], ["typicality"])]
)
def test_python_methods_may_be_one_string_and_repeat(runs, methods, expected):
    result = elbox.ood(
        runs / "vae",
        str(runs / "noise.npy"),
        inliers=str(runs / "inliers.npy"),
        methods=methods,
        limit=8,
        iw_samples=2,
        bootstrap=2,
    )
    assert list(result["methods"]) == expected


def test_python_empty_method_list_is_refused(runs):
    with pytest.raises(ElboxError, match="give at least one anomaly score method"):
        elbox.ood(runs / "vae", str(runs / "noise.npy"), methods=[], limit=8, iw_samples=2, bootstrap=2)


# -- inputs given in memory, and a background that is not a run -----------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(inliers=None), "the inliers: input array has dtype object"),
        (dict(reference=np.zeros((0, 8, 8), np.uint8)), "the reference: input array is empty"),
        (dict(inliers=np.full((3, 8, 8), np.nan)), "the inliers: input array has the value nan"),
        (dict(background=3), "the background must be a Run, a model or a run directory, got int"),
    ],
)
def test_python_errors_name_the_set_given_in_memory(runs, kwargs, message):
    with pytest.raises(ElboxError) as error:
        elbox.ood(
            runs / "vae",
            np.load(runs / "noise.npy"),
            **{"inliers": str(runs / "inliers.npy"), **kwargs},
            methods=["likelihood"],
            limit=8,
            iw_samples=2,
            bootstrap=2,
        )
    assert message in str(error.value)


def test_a_background_not_trained_on_perturbed_data_is_warned_about(runs):
    with pytest.warns(UserWarning, match="was not trained on perturbed data"):
        result = elbox.ood(
            runs / "vae",
            str(runs / "noise.npy"),
            inliers=str(runs / "inliers.npy"),
            reference="train",
            background=runs / "vae",
            methods=["background"],
            limit=8,
            iw_samples=2,
            bootstrap=2,
        )
    assert result["methods"]["background"]["auroc"] == 0.5  # the same model: every ratio is 0


# -- one bootstrap resample -----------------------------------------------------------------------------------------


def test_one_bootstrap_resample_writes_strict_json_and_no_plus_minus(runs, capsys):
    code = ood_command(runs, "vae", "--methods", "likelihood", "--bootstrap", "1", json_name="one.json")
    assert code == 0
    text = (runs / "one.json").read_text()
    result = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))  # NaN is not JSON
    assert result["methods"]["likelihood"]["auroc_stderr"] is None
    table = capsys.readouterr().out
    assert "likelihood" in table and "± nan" not in table and "±" not in table.split("likelihood", 2)[-1]


# -- a diffusion model's p-values: the reference scored as the input ------------------------------------------------


def test_score_methods_of_an_elbo_model_score_the_reference_with_the_same_elbo_samples(runs, tmp_path):
    """Scoring the reference data themselves: each example's score is one of the reference scores, so the p-values
    are exactly 2/(M+1), 3/(M+1), ..., 1 (distinct scores); with the reference scored by fewer ELBO draws than the
    input they were not."""
    data = tmp_path / "six.npy"
    np.save(data, np.load(runs / "noise.npy")[:6])
    out = tmp_path / "scores.csv"
    assert (
        main(
            [
                "score",
                str(runs / "diffusion"),
                "--input",
                str(data),
                "--reference",
                str(data),
                "--method",
                "likelihood",
                "typicality",
                "--elbo-samples",
                "3",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(out.open()))
    for method in ("likelihood", "typicality"):
        p = sorted(float(r[f"p_value_{method}"]) for r in rows)
        assert p == pytest.approx([k / 7 for k in range(2, 8)], abs=1e-5), method


# -- tables, and output files ---------------------------------------------------------------------------------------


def test_complexity_of_a_table_run_is_refused_clearly(runs, capsys):
    code = main(
        [
            "ood",
            str(runs / "table"),
            "--outliers",
            str(runs / "table_out.csv"),
            "--methods",
            "complexity",
            "--json",
            str(runs / "never.json"),
            "--no-progress",
        ]
    )
    assert code == 1 and "complexity" in one_error_line(capsys) and not (runs / "never.json").exists()


@pytest.mark.parametrize(
    "run, outliers, message",
    [
        ("table", "noise.npy", "the model takes vectors of 3 values"),
        ("vae", "table.csv", "is a table; the vae model takes 8-bit images"),
        ("vae", "missing.npy", "--outliers"),
    ],
)
def test_data_of_the_other_kind_is_refused(runs, capsys, run, outliers, message):
    code = main(
        [
            "ood",
            str(runs / run),
            "--outliers",
            str(runs / outliers),
            "--json",
            str(runs / "never.json"),
            "--no-progress",
        ]
    )
    assert code == 1 and message in one_error_line(capsys) and not (runs / "never.json").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--json", "{tmp}/user.json"], "user.json exists and is not an output elbox wrote"),
        (
            ["--json", "{tmp}/fresh.json", "--figure", "{tmp}/user.png"],
            "user.png exists and is not an output elbox wrote",
        ),
        (["--json", "{tmp}/user.png"], "this output is a .json file"),
        (["--json", "{tmp}/result"], "this output is a .json file"),
        (["--json", "{tmp}/folder.json"], "it is a directory"),
        (["--json", "{tmp}/fresh.json", "--figure", "{tmp}/fresh.jpg"], "this output is a .png file"),
    ],
)
def test_output_files_are_checked_before_any_work_and_user_files_kept(runs, capsys, tmp_path, argv, message):
    (tmp_path / "user.json").write_text('{"mine": 1}')
    (tmp_path / "user.png").write_bytes(b"my picture")
    (tmp_path / "folder.json").mkdir()
    code = main(
        [
            "ood",
            str(runs / "vae"),
            "--outliers",
            str(runs / "noise.npy"),
            "--no-progress",
            *[a.format(tmp=tmp_path) for a in argv],
        ]
    )
    assert code == 1 and message in one_error_line(capsys)
    assert (tmp_path / "user.json").read_text() == '{"mine": 1}' and (
        tmp_path / "user.png"
    ).read_bytes() == b"my picture"
    assert not (tmp_path / "fresh.json").exists() and not (tmp_path / "fresh.png").exists()
