"""`elbox report RUN_DIR`: one self-contained HTML page (images inlined as PNG data URIs) and a Markdown twin.

It leads with the result: the headline bound(s) with units and standard errors (from the evaluation `elbox evaluate`
saved, RUN_DIR/eval-test.json or else RUN_DIR/eval-validation.json (own data are evaluated on their validation
split), or a quick evaluation of the first test images (own data: validation images) when there is none, and it says
which, with K and the number of examples), the model in one line, the training time, the elbox version and the date.
Then: training curves (the bound and the KL on separate panels); the evaluation table; sample and reconstruction grids
(rows labelled); latent interpolations (models with a decoder); for 2-D latents, a scatter of the encodings of those
images, coloured by label where they have labels; and last, folded, the run's settings.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
from datetime import datetime, timezone
from pathlib import Path

import torch

from elbox.core.version import __version__
from elbox.data import load_split, space_from_record
from elbox.data.inputs import as_examples, first, run_data
from elbox.evaluation.evaluator import evaluate
from elbox.evaluation.inference import reconstruction_grid
from elbox.evaluation.tables import format_table
from elbox.io.atomic import WRITTEN_BY, atomic_write_bytes, check_replaceable
from elbox.io.checkpoint import load_run
from elbox.io.figures import curves_png, grid_png_of, interpolations_png, scatter_png
from elbox.models.base import Encoder, Hierarchical, Reconstructs, SingleLatentDecoder
from elbox.present.run_files import (
    evaluated_on,
    full_evaluation,
    headline_of,
    model_line,
    read_records,
    saved_ood,
    saved_samples,
    title_of,
    training_line,
)

QUICK_EVAL_EXAMPLES = 1000
QUICK_EVAL_K = [1, 100]


@dataclasses.dataclass
class Report:
    """What the page shows, in order: the title; the headline bound and its detail line; facts [(label, text)]
    (where the numbers come from, the model, the training, the data, elbox and the date); sections [(heading, text,
    png bytes or b"")]; the run's settings as JSON (folded at the end). result: the evaluation shown."""

    title: str
    headline: str
    detail: str
    facts: list[tuple[str, str]]
    sections: list[tuple[str, str, bytes]]
    settings: str
    result: dict


def build_report(run_dir: str | Path, device: torch.device, seed: int = 0) -> Report:
    run_dir = Path(run_dir)
    model, config = load_run(run_dir, device)
    data = config["data"]
    if "name" in data:
        images, labels = load_split(data["name"], "test", data.get("data_dir"))
    else:  # your own data: the run's validation examples, unlabelled
        _, val, _ = run_data(data, config.get("train", {}).get("seed", 0))
        images, labels = as_examples(first(val, QUICK_EVAL_EXAMPLES), "validation data"), None
    examples = evaluated_on(data, "images" if images.dim() == 4 else "examples")
    space = space_from_record(data)
    num_dims = math.prod(images.shape[1:])
    x = space.eval_data(images[:QUICK_EVAL_EXAMPLES].to(device), seed=seed)
    eval_path, result = full_evaluation(run_dir)
    if result is not None:
        ks = ", ".join(map(str, result.get("nll_iw_by_k", {})))
        split = result.get("split", eval_path.stem.removeprefix("eval-"))
        source = (
            f"from {eval_path.name} (elbox evaluate, the {split} split): {result['n_examples']} examples of "
            f"{result.get('dataset', 'the ' + split + ' split')}" + (f", K = {ks} importance samples" if ks else "")
        )
    else:
        result = evaluate(model, x, space.log_prob_offset(num_dims), iw_samples=QUICK_EVAL_K, seed=seed)
        ks = ", ".join(map(str, result.get("nll_iw_by_k", {})))
        source = (
            f"from a quick evaluation made by elbox report: the first {x.shape[0]:,} {examples}"
            + (f", K = {ks} importance samples" if ks else "")
            + "; run elbox evaluate for the full protocol"
        )
    records = read_records(run_dir)
    trained = datetime.fromtimestamp((run_dir / "config.json").stat().st_mtime, timezone.utc)
    headline, detail = headline_of(result)
    facts = [
        ("result", source),
        ("model", model_line(model, config)),
        ("training", training_line(records)),
        (
            "data",
            f"{data.get('name', data.get('path', 'your data'))} [{data.get('space', space.name)}], {num_dims:,} "
            "dimensions",
        ),
        (
            "elbox",
            f"{__version__}; run started {trained:%Y-%m-%d}, report made {datetime.now(timezone.utc):%Y-%m-%d %H:%M} "
            "UTC",
        ),
    ]
    sections = []
    curves = [r for r in records if "step" in r]  # gradient training (closed-form fits have no steps)
    if curves:
        sections.append(
            (
                "Training curves",
                "Per logged step (training batches, the β = 1 ELBO) and per epoch (validation).",
                curves_png(curves, num_dims * math.log(2)),
            )
        )
    sections.append(("Evaluation", f"Numbers {source}.\n\n{format_table(result)}", b""))
    detection = saved_ood(run_dir / "ood.json")
    if detection is not None:
        sections.append(("Out-of-distribution detection", *detection))
    samples_png = saved_samples(run_dir / "samples.png")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if images.dim() == 4:  # pictures of images (none for vectors)
            grid = samples_png or grid_png_of(model.sample(64))
            sections.append(("Samples", "Draws from the model (means of p(x|z) for latent-variable models).", grid))
            if isinstance(model, Reconstructs):
                pairs = reconstruction_grid(model, x[:32], nrow=8)
                text = (
                    f"Rows alternate: input images ({examples}), then their reconstructions (the means of p(x | "
                    "E[z|x]))."
                )
                sections.append(
                    ("Reconstructions", text, grid_png_of(pairs, nrow=8, row_labels=("input", "reconstruction")))
                )
            if isinstance(model, SingleLatentDecoder) and not isinstance(model, Hierarchical) and x.shape[0] >= 2:
                sections.append(
                    (
                        "Latent interpolations",
                        f"Decoded straight lines between the posterior means of pairs of {examples}.",
                        interpolations_png(model, x),
                    )
                )
            if isinstance(model, Encoder) and result.get("latent_dim") == 2:
                coloured = ", coloured by class label" if labels is not None else " (unlabelled: one colour)"
                sections.append(
                    (
                        "Latent space",
                        f"Posterior means of {examples}{coloured}.",
                        scatter_png(model, x, None if labels is None else labels[: x.shape[0]]),
                    )
                )
    settings = json.dumps(
        {
            "run_dir": str(run_dir),
            "model": config["model"],
            "model_config": config["model_config"],
            "data": data,
            "train": config.get("train", {}),
        },
        indent=1,
    )
    return Report(title_of(config, run_dir), headline, detail, facts, sections, settings, result)


# The page reports, in <body data-images-loaded="n/m">, how many of its images decoded (checked by the tests).
_IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const ok = images.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + images.length);
});
</script>"""


# The page fits the window (no sideways scrolling at 1280 px or less): long words (paths of own data) wrap anywhere,
# images shrink to the column, and the evaluation table and the settings (preformatted) scroll inside their own box.
_STYLE = """<style>
*{box-sizing:border-box;}
body{font-family:sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;overflow-wrap:anywhere;}
h1{font-size:1.4em;margin:0 0 .5em;}
#headline{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;margin-bottom:1.5em;background:#fafafa;}
#headline .bound{font-size:1.5em;font-weight:bold;margin:.2em 0;}
#headline .detail{margin:.2em 0 .6em;}
#headline th{text-align:left;padding-right:1em;vertical-align:top;color:#555;font-weight:normal;white-space:nowrap;}
table{max-width:100%;border-collapse:collapse;}
pre{background:#f6f6f6;padding:1em;max-width:100%;overflow-x:auto;}
img{max-width:100%;height:auto;image-rendering:pixelated;}
</style>"""


def to_html(report: Report) -> str:
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><meta name='generator' content='{WRITTEN_BY}'>"
        f"<title>{e(report.title)}</title>",
        _STYLE,
        _IMAGE_CHECK,
        "</head><body>",
        f"<h1>{e(report.title)}</h1>",
        "<section id='headline'>",
        f"<p class='bound'>{e(report.headline)}</p>",
        f"<p class='detail'>{e(report.detail)}</p>",
        "<table>"
        + "".join(f"<tr><th>{e(label)}</th><td>{e(text)}</td></tr>" for label, text in report.facts)
        + "</table>",
        "</section>",
    ]
    for heading, text, png in report.sections:
        slug = heading.lower().replace(" ", "-")
        parts.append(f"<h2 id='{slug}'>{e(heading)}</h2><pre>{e(text)}</pre>")
        if png:
            parts.append(f"<img alt='{e(heading)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    parts += [
        "<h2 id='run-settings'>Run settings</h2>",
        "<details><summary>model, data and training settings "
        f"(config.json)</summary><pre>{e(report.settings)}</pre></details>",
        "</body></html>",
    ]
    return "\n".join(parts)


def image_name(heading: str) -> str:
    """The file name of a section's image beside the Markdown (in report/)."""
    return heading.lower().replace(" ", "-") + ".png"


def to_markdown(report: Report) -> str:
    """The Markdown twin, in the same order; its images are linked as report/NAME.png (write_report writes them)."""
    lines = [
        f"<!-- generator: {WRITTEN_BY} -->",
        f"# {report.title}",
        "",
        f"**{report.headline}**",
        "",
        report.detail,
        "",
    ]
    lines += [f"- {label}: {text}" for label, text in report.facts] + [""]
    for heading, text, png in report.sections:
        lines += [f"## {heading}", "", "```", text, "```", ""]
        if png:
            lines += [f"![{heading}](report/{image_name(heading)})", ""]
    lines += [
        "## Run settings",
        "",
        "<details><summary>model, data and training settings (config.json)</summary>",
        "",
        "```json",
        report.settings,
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)


def write_report(
    run_dir: str | Path, device: torch.device, out: str | Path | None = None, seed: int = 0, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write RUN_DIR/report.html (self-contained) and RUN_DIR/report.md with its images in RUN_DIR/report/ (beside
    `out` when given). An image file there that elbox did not write is refused before anything is written, unless
    `overwrite` (elbox.io.atomic.check_replaceable)."""
    run_dir = Path(run_dir)
    report = build_report(run_dir, device, seed)
    html_path = Path(out) if out else run_dir / "report.html"
    md_path = html_path.with_suffix(".md")
    images = {html_path.parent / "report" / image_name(heading): png for heading, _, png in report.sections if png}
    for path in images:
        check_replaceable(path, overwrite)
    atomic_write_bytes(html_path, to_html(report).encode())
    for path, png in images.items():
        atomic_write_bytes(path, png)
    atomic_write_bytes(md_path, to_markdown(report).encode())
    return html_path, md_path
