"""elbox report: a self-contained HTML page that renders in headless Chromium with all its images, and Markdown."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from elbox.cli import main

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def render(html_path) -> str:
    """The DOM after the page loaded, from headless Chromium (installed by scripts/get-chromium.sh)."""
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    assert browser, "headless Chromium is needed for this test: run scripts/get-chromium.sh (Debian package chromium)"
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", "--dump-dom", html_path.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize("evaluated", [False, True])
def test_report_renders_with_all_images(tmp_path, evaluated):
    run = tmp_path / "run"
    assert main(["train", "--data", "synthetic", "--epochs", "2", "--latent-dim", "2", "--hidden-dims", "32",
                 "--out", str(run), "--no-progress"]) == 0
    if evaluated:
        assert main(["evaluate", str(run), "--iw-samples", "1", "10", "--limit", "50", "--no-progress"]) == 0
    assert main(["report", str(run)]) == 0
    dom = render(run / "report.html")
    headings = re.findall(r"<h2[^>]*>([^<]*)</h2>", dom)
    assert headings == ["Run", "Training curves", "Evaluation", "Samples", "Reconstructions", "Latent interpolations", "Latent space"]
    assert 'data-images-loaded="5/5"' in dom  # every inlined PNG decoded
    assert "NLL (IWAE, K=10)" in dom if evaluated else "quick evaluation of the first" in dom
    assert "active units" in dom
    markdown = (run / "report.md").read_text()
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown)
    assert len(links) == 5 and all((run / link).stat().st_size > 1000 for link in links)


def test_report_for_a_diffusion_run_and_a_hierarchical_run(tmp_path):
    for model in (["--model", "diffusion", "--unet-channels", "4", "8"], ["--model", "hvae", "--hvae-type", "markov", "--levels", "2"]):
        run = tmp_path / model[1]
        assert main(["train", *model, "--data", "synthetic", "--epochs", "1", "--limit-train", "64", "--out", str(run), "--no-progress"]) == 0
        assert main(["report", str(run)]) == 0
        dom = render(run / "report.html")
        n = 2 if model[1] == "diffusion" else 3  # curves, samples (+ reconstructions)
        assert f'data-images-loaded="{n}/{n}"' in dom
