"""elbox report: a self-contained HTML page that leads with the result (on the first screen of headless Chromium),
renders with all its images, and a Markdown twin in the same order."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import elbox
from elbox.cli.main import main
from elbox.io.figures import curves_figure
from elbox.io.plots import image_grid
from elbox.present.run_files import headline_of, model_line

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
SCREEN = (1280, 800)
# added to a copy of the page: where the headline lies once the page has loaded, in the viewport of one screen
MEASURE = """<script>window.addEventListener("load", () => {
  const box = document.getElementById("headline").getBoundingClientRect();
  document.body.setAttribute("data-headline-box", [box.top, box.bottom, window.innerHeight].join(" "));
});</script>"""
# the same for the page's width: wider than the window means the page scrolls sideways
MEASURE_WIDTH = """<script>window.addEventListener("load", () => {
  document.body.setAttribute("data-scroll-width", document.scrollingElement.scrollWidth);
});</script>"""


def chromium() -> str | None:
    return next((b for b in map(shutil.which, BROWSERS) if b), None)


def render(html_path, tmp_path=None, measure: str = MEASURE) -> str:
    """The DOM after the page loaded, from headless Chromium (installed by scripts/get-chromium.sh) in a 1280 x 800
    window. With tmp_path, a copy of the page with the script `measure` (by default: it records the headline's box
    in <body data-headline-box>)."""
    browser = chromium()
    assert browser, "headless Chromium is needed for this test: run scripts/get-chromium.sh (Debian package chromium)"
    if tmp_path is not None:
        page = tmp_path / "measured.html"
        page.write_text(html_path.read_text().replace("</body>", measure + "</body>"))
        html_path = page
    result = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--window-size={SCREEN[0]},{SCREEN[1]}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            html_path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize("evaluated", [False, True])
def test_report_leads_with_the_result_and_renders_with_all_images(tmp_path, evaluated):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                "synthetic",
                "--epochs",
                "2",
                "--latent-dim",
                "2",
                "--hidden-dims",
                "32",
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    if evaluated:
        assert main(["evaluate", str(run), "--iw-samples", "1", "10", "--limit", "50", "--no-progress"]) == 0
    assert main(["report", str(run)]) == 0
    dom = render(run / "report.html", tmp_path)
    # the headline is on the first screen: its whole box within the 1280 x 800 window
    top, bottom, screen = map(float, re.search(r'data-headline-box="([^"]*)"', dom).group(1).split())
    assert 0 <= top < bottom <= screen <= SCREEN[1], (top, bottom, screen)
    headline = re.search(r"<section id=\"headline\">(.*?)</section>", dom, re.DOTALL).group(1)
    k = 10 if evaluated else 100
    assert re.search(
        rf"NLL ≤ \d+\.\d\d ± \d+\.\d\d nats per example \(IWAE bound, K = {k}\) · \d\.\d+ ± \d\.\d+ bits/dim", headline
    )
    assert re.search(rf"gap -ELBO - NLL_K \(K = {k}\) -?\d+\.\d\d ± \d+\.\d\d nats", headline)  # the gap with its ±
    if evaluated:
        assert "from eval-test.json (elbox evaluate, the test split): 50 examples of synthetic test" in headline
        assert "K = 1, 10 importance" in headline and "quick" not in headline
    else:
        assert (
            "quick evaluation made by elbox report: the first 200 test images of synthetic, K = 1, 100 importance"
            in headline
        )
    parameters = sum(p.numel() for p in elbox.load(run).parameters())
    assert f"VAE, latent 2, MLP 784-32, Bernoulli likelihood, {parameters:,} parameters" in headline
    assert "2 epochs" in headline and f"<td>{elbox.__version__}; run started 20" in headline
    # then the sections, and the settings last, folded
    headings = re.findall(r"<h2[^>]*>([^<]*)</h2>", dom)
    assert headings == [
        "Training curves",
        "Evaluation",
        "Samples",
        "Reconstructions",
        "Latent interpolations",
        "Latent space",
        "Run settings",
    ]
    assert dom.index("<details>") > dom.rindex("<img") and '"latent_dim": 2' in dom[dom.index("<details>") :]
    assert 'data-images-loaded="5/5"' in dom  # every inlined PNG decoded
    assert "NLL (IWAE, K=10)" in dom if evaluated else "quick evaluation" in dom
    assert "active units" in dom
    markdown = (run / "report.md").read_text()
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown)
    assert len(links) == 5 and all((run / link).stat().st_size > 1000 for link in links)
    order = [
        markdown.index(s)
        for s in ("**NLL ≤", "- model: VAE", "## Training curves", "## Latent space", "## Run settings", "<details>")
    ]
    assert order == sorted(order)


def test_report_for_a_diffusion_run_and_a_hierarchical_run(tmp_path):
    for model in (
        ["--model", "diffusion", "--unet-channels", "4", "8"],
        ["--model", "hvae", "--hvae-type", "markov", "--levels", "2"],
    ):
        run = tmp_path / model[1]
        assert (
            main(
                [
                    "train",
                    *model,
                    "--data",
                    "synthetic",
                    "--epochs",
                    "1",
                    "--limit-train",
                    "64",
                    "--out",
                    str(run),
                    "--no-progress",
                ]
            )
            == 0
        )
        assert main(["report", str(run)]) == 0
        dom = render(run / "report.html")
        n = 2 if model[1] == "diffusion" else 3  # curves, samples (+ reconstructions)
        assert f'data-images-loaded="{n}/{n}"' in dom
        assert "NLL ≤" in dom and "bits/dim" in dom


def write_folder(root, n: int = 60, size: int = 8):
    """n grayscale PNGs of a bright square at a random place: a user's own data."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        image = np.full((size, size), 20, dtype=np.uint8)
        r, c = rng.integers(0, size - 3, 2)
        image[r : r + 4, c : c + 4] = 230
        Image.fromarray(image).save(root / f"{i:03d}.png")
    return root.resolve()


def test_report_on_own_data_uses_the_saved_validation_evaluation_names_the_data_and_fits_the_window(tmp_path):
    """Own data have no test split: `elbox evaluate` saves eval-validation.json, which the report must use (a quick
    evaluation only before there is one); captions name the validation images of the data's path, not "test
    images"; and a long path (one word) must not make the page scroll sideways."""
    folder = write_folder(tmp_path / ("my-images-" + "x" * 150))
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "vae",
                "--data",
                str(folder),
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--latent-dim",
                "2",
                "--hidden-dims",
                "16",
                "--workers",
                "1",
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    assert main(["report", str(run), "--out", str(tmp_path / "quick.html")]) == 0
    page = (tmp_path / "quick.html").read_text()
    assert f"quick evaluation made by elbox report: the first 6 validation images of {folder}, K = 1, 100" in page
    assert f"Posterior means of validation images of {folder} (unlabelled: one colour)." in page
    assert f"pairs of validation images of {folder}." in page and "test images" not in page

    assert main(["evaluate", str(run), "--iw-samples", "1", "5", "--no-progress"]) == 0
    assert (run / "eval-validation.json").is_file() and not (run / "eval-test.json").exists()
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert (
        f"from eval-validation.json (elbox evaluate, the validation split): 6 examples of {folder} (the run&#x27;s "
        "validation data), K = 1, 5 importance samples"
    ) in page
    assert "quick" not in page and "NLL (IWAE, K=5)" in page
    # the page fits a 1280 px window: long words wrap, images shrink, preformatted text scrolls in its own box
    assert "overflow-wrap:anywhere" in page and "img{max-width:100%;height:auto;" in page
    assert "table{max-width:100%;" in page and "overflow-x:auto" in page
    if chromium():
        dom = render(run / "report.html", tmp_path, MEASURE_WIDTH)
        width = int(re.search(r'data-scroll-width="(\d+)"', dom).group(1))
        assert width <= SCREEN[0], width


def test_curves_of_a_short_run_have_markers():
    """One epoch can log one training record: a line through one point draws nothing, so few points get markers."""
    records = [
        {"kind": "train", "step": 5, "elbo": -500.0, "reconstruction": -490.0, "kl": 10.0},
        {"kind": "epoch", "step": 5, "val_elbo": -480.0, "val_kl": 9.0},
    ]
    lines = [line for ax in curves_figure(records, bits=784 * 0.693).axes for line in ax.get_lines()]
    assert len(lines) == 5 and all(line.get_marker() not in (None, "", "None") for line in lines)
    long = [
        {"kind": "train", "step": s, "elbo": -500.0 + s, "reconstruction": -490.0 + s, "kl": 10.0}
        for s in range(1, 100)
    ]
    lines = [line for ax in curves_figure(long, bits=784 * 0.693).axes for line in ax.get_lines()]
    training = [line for line in lines if "training batches" in line.get_label()]
    assert len(training) == 3 and all(
        line.get_marker() in (None, "", "None") for line in training
    )  # many points: a line


def test_kl_and_the_bound_have_separate_axes():
    """-ELBO (hundreds of nats) and the KL (a few) on one axis would flatten one of them: they get a panel each."""
    records = [
        {"kind": "train", "step": s, "elbo": -500.0 + s, "reconstruction": -490.0 + s, "kl": 10.0 - s / 10}
        for s in range(1, 30)
    ]
    records += [{"kind": "epoch", "step": s, "val_elbo": -480.0 + s, "val_kl": 9.0 - s / 10} for s in (10, 20)]
    fig = curves_figure(records, bits=784 * 0.693)
    labels = [{line.get_label() for line in ax.get_lines()} for ax in fig.axes if ax.get_lines()]
    assert len(labels) == 2
    bound, kl = labels
    assert {"-ELBO (validation)", "-ELBO (training batches)"} <= bound and not any("kl" in label for label in bound)
    assert {"kl (validation)", "kl (training batches)"} == kl
    assert all(ax.get_yscale() == "linear" for ax in fig.axes if ax.get_lines())  # nothing spans 100x here


def test_headline_names_the_best_bound_with_its_standard_error():
    exact = {
        "nll_exact": 80.0,
        "nll_exact_stderr": 0.5,
        "elbo": -81.0,
        "elbo_stderr": 0.6,
        "reconstruction": -70.0,
        "kl": 11.0,
        "gap_elbo": 1.0,
        "gap_elbo_stderr": 0.1,
        "bpd": 0.15,
        "bpd_stderr": 0.001,
    }
    best, detail = headline_of(exact)
    assert best == "NLL = 80.00 ± 0.50 nats per example (exact) · 0.1500 ± 0.0010 bits/dim"
    assert detail == "ELBO -81.00 ± 0.60 nats (reconstruction -70.00, KL 11.00); gap -ELBO - NLL 1.00 ± 0.10 nats"
    elbo_only = {"elbo": -90.0, "elbo_stderr": 0.25, "reconstruction": -80.0, "kl": 10.0}
    assert headline_of(elbo_only)[0] == "NLL ≤ 90.00 ± 0.25 nats per example (-ELBO)"
    assert headline_of({"bpd": 1.5, "bpd_stderr": 0.1, "bpd_source": "exact"})[0] == "1.5000 ± 0.1000 bits/dim (exact)"


def test_a_model_fitted_without_gradients_counts_its_fitted_numbers():
    from elbox.models import build_model

    model = build_model("mixture", {"data_shape": [5], "n_components": 3})
    line = model_line(
        model, {"model": "mixture", "model_config": {"data_shape": [5], "n_components": 3, "covariance": "full"}}
    )
    n = sum(t.numel() for t in model.state_dict().values())
    assert line == f"GaussianMixture, 3 components, full covariance, {n:,} fitted numbers" and n > 0


def test_reconstruction_rows_are_labelled():
    images = torch.rand(16, 1, 8, 8)
    plain, labelled = image_grid(images, nrow=8), image_grid(images, nrow=8, row_labels=("input", "reconstruction"))
    margin = labelled.width - plain.width
    assert margin > 40 and labelled.height == plain.height
    assert labelled.crop((margin, 0, labelled.width, labelled.height)).tobytes() == plain.tobytes()
    for row in range(2):  # text in the margin of each row
        band = labelled.crop((0, row * plain.height // 2, margin, (row + 1) * plain.height // 2))
        assert band.getextrema()[0] < 100, row
