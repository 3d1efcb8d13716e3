"""Writing an evaluation's results: CSV, a markdown table, plots and sample grids.

Owns the files ``dprdm eval`` leaves in ``--out``:

* ``runs.csv`` / ``runs.json`` -- one row per setting (every number of the run);
* ``results.md`` -- the paper-style table, the real held-out reference row and the caveats;
* ``fid_kid_vs_epsilon.png`` -- FID and KID against epsilon, one line per number of queries,
  public-only and non-private as horizontal lines;
* ``samples.png`` -- prompts x settings, with the real held-out image in the last column;
* ``images.npz`` -- every generated image (one uint8 array per setting label), the real
  held-out images and the prompts, to re-score with other metrics without generating again.

Every file is written atomically (temporary file + rename).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from dprdm.evaluation.harness import DEFAULT_STYLE_TARGET, EvalResult, retarget_key
from dprdm.files import write_bytes_atomically
from dprdm.image_files import image_grid, png_bytes

CSV_COLUMNS = [
    "setting", "label", "epsilon", "queries", "delta", "sigma", "q", "k", "lam", "prompts",
    "private", "noise_to_signal", "fid", "fid_std", "kid", "kid_std", "fid_style", "fid_style_std",
    "kid_style", "kid_style_std", "fid_strict", "fid_strict_std", "kid_strict", "kid_strict_std",
    "precision", "recall", "density",
    "coverage", "concept_top1", "concept_top10", "category_acc", "openmoji_like",
    "openmoji_probability_mean", "openmoji_like_strict", "alignment", "alignment_std",
    "alignment_mismatched",
    "kid_vs_public_only", "kid_vs_public_only_std", "closer_than_public_only",
    "experiment_ledgers", "queries_charged", "epsilon_spent_max", "generation_s",
]
TABLE_COLUMNS = [
    ("setting", "setting"), ("epsilon", "eps"), ("queries", "queries"), ("sigma", "sigma"),
    ("q", "q"), ("k", "k"), ("lam", "lam"), ("fid", "FID"), ("kid", "KID x1e3"),
    ("kid_vs_public_only", "KID - public-only x1e3 (paired)"),
    ("closer_than_public_only", "closer than public-only"),
    ("fid_style", "FID style"), ("kid_style", "KID style x1e3"),
    ("fid_strict", "FID strict"), ("kid_strict", "KID strict x1e3"),
    ("precision", "prec."), ("recall", "rec."), ("density", "dens."), ("coverage", "cov."),
    ("concept_top1", "top-1"), ("concept_top10", "top-10"), ("category_acc", "category"),
    ("openmoji_like", "OpenMoji-like"), ("openmoji_like_strict", "OpenMoji-like (strict)"),
    ("alignment", "align."),
]
SAMPLE_ROWS = 16


def retarget_columns(columns, target: str | None):
    """Column keys and titles for a style judge of `target` (``OpenMoji-like (strict)`` ->
    ``EmojiOne-like (strict)``, key ``openmoji_like_strict`` -> ``emojione_like_strict``)."""
    if not target or target == DEFAULT_STYLE_TARGET:
        return list(columns)
    return [(retarget_key(c[0], target), c[1].replace("OpenMoji", target))
            if isinstance(c, tuple) else retarget_key(c, target) for c in columns]


def cell(key: str, row: dict[str, Any]) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key.startswith("kid"):
        return f"{1e3 * value:.2f} ± {1e3 * row.get(key + '_std', 0.0):.2f}"
    if key.startswith("fid") and row.get(key + "_std") is not None:
        return f"{value:.2f} ± {row[key + '_std']:.2f}"
    if key == "setting":
        return "non-private (NOT private)" if value == "non-private" else str(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if key in ("epsilon", "q", "lam"):
            return f"{value:g}"
        if key == "sigma":
            return f"{value:.4f}"
        if key == "fid":
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


def present_columns(rows: list[dict[str, Any]],
                    columns: list[tuple[str, str]] = TABLE_COLUMNS) -> list[tuple[str, str]]:
    """The columns that hold a value in at least one row (demo-only scores vanish elsewhere)."""
    return [(key, title) for key, title in columns
            if key == "setting" or any(row.get(key) is not None for row in rows)]


def markdown_table(rows: list[dict[str, Any]], target: str | None = None) -> str:
    columns = present_columns(rows, retarget_columns(TABLE_COLUMNS, target))
    header = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    lines = [header, rule]
    for row in rows:
        lines.append("| " + " | ".join(cell(key, row) for key, _ in columns) + " |")
    return "\n".join(lines)


def csv_text(rows: list[dict[str, Any]], target: str | None = None) -> str:
    columns = retarget_columns(CSV_COLUMNS, target)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: ("" if row.get(key) is None else row.get(key))
                         for key in columns})
    return buffer.getvalue()


def results_markdown(result: EvalResult) -> str:
    plan = result.notes["plan"]
    reference = result.notes["reference"]
    target = result.notes.get("style_target")
    real_row = dict(reference, setting="real held-out images")
    judged = bool(target) and target != DEFAULT_STYLE_TARGET
    lines = [
        "# dprdm eval",
        "",
        *([f"**{result.notes['domain']}**", ""] if result.notes.get("domain") else []),
        f"{len(result.held_out.captions)} prompts = captions of held-out private images (the "
        f"reference set of FID/KID/PRDC); {_per_prompt(plan.get('repeats', 1))} per prompt and "
        f"setting, the same diffusion seeds in every setting; guidance {plan['guidance']}"
        f"{_content_guidance(plan)}, "
        f"{plan['steps']} sampler steps{_pooling(plan)}{_public_mix(plan)}"
        f"{_non_private_mix(plan)}.",
        "",
        markdown_table(result.runs, target),
        "",
        "Real held-out images, scored by the same classifiers and encoder:",
        "",
        markdown_table([real_row], target),
        "",
        f"* FID/KID/PRDC: measured in the feature space of "
        f"{result.notes.get('feature_space', 'the evaluation feature extractor')} (see "
        "docs/evaluation.md). KID is the unbiased one at a few hundred samples: compare "
        "settings by KID ± its std first. FID ± the std of 20 bootstrap resamples. "
        "align. = mean cosine between each image and its prompt in the encoder.",
        "* KID - public-only (paired): the setting's full-set KID minus public-only's, ± the std "
        "of a paired bootstrap (each resample draws the same held-out images and prompts, with "
        "all their repeats, for both settings); 'closer than public-only' = the share of "
        "resamples in which the setting is the closer one. This is the test for 'better than "
        "public-only': the two settings' own KID stds overstate the uncertainty of a difference.",
        *([f"* {target}-like (strict) and FID/KID strict: the {target} style judge "
           f"(dprdm.validation's judge of the domain: {target} against every public collection a "
           "generator may train on, as it is, through the style augmentations and through a "
           "family of procedural styles), its share of images with P >= 0.5 and the metrics in "
           "its feature space. There is no non-strict counterpart (no 'FID style' column)."]
          if judged else
          ["* FID/KID style and strict: the same metrics in the feature spaces of the two "
           "OpenMoji style networks (style: OpenMoji vs the raw public styles; strict: vs the "
           "public styles and their augmentations). They see the look that the concept network "
           "is trained to ignore; they are specific to the emoji demo."]
          if result.notes.get("demo_metrics", True) else
          ["* Concept, style and OpenMoji-like scores are measured on the emoji demo only "
           "(its classifiers know emoji); on this data the report holds FID/KID/PRDC and the "
           "alignment."]),
        "* DP rows: sigma calibrated so that `queries` releases reach epsilon at delta "
        f"{plan['delta']:g} (PLD accountant); charged to in-memory EXPERIMENT ledgers, never the "
        "index's own ledger. With more prompts than `queries`, prompts were split over several "
        "experiment ledgers of `queries` releases each.",
        "* noise_to_signal (runs.csv): sigma * sqrt(d) over the median norm of a k-neighbour mean "
        "measured on the PUBLIC index (the private aggregates' norms are not released).",
        f"* {result.notes['non_private']}.",
        f"* {result.notes['warning']}",
        f"* {PRIVATE_REPORT_WARNING}",
        "",
    ]
    return "\n".join(lines)


def plot_png(rows: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = [r for r in rows if r["setting"] == "dp"]
    levels = {r["setting"]: r for r in rows if r["setting"] in ("public-only", "non-private")}
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for axis, key, title in ((axes[0], "fid", "FID"), (axes[1], "kid", "KID")):
        for queries in sorted({r["queries"] for r in dp}):
            line = sorted((r for r in dp if r["queries"] == queries), key=lambda r: r["epsilon"])
            x = [r["epsilon"] for r in line]
            y = [r[key] for r in line]
            errors = [r[f"{key}_std"] for r in line]
            axis.errorbar(x, y, yerr=errors, marker="o", capsize=3,
                          label=f"DP-RDM, {queries:,} queries")
        styles = {"public-only": ("tab:red", "--"), "non-private": ("tab:green", ":")}
        for name, row in levels.items():
            colour, dash = styles[name]
            label = name if name == "public-only" else "non-private (NOT private)"
            axis.axhline(row[key], color=colour, linestyle=dash, label=label)
            axis.axhspan(row[key] - row[f"{key}_std"], row[key] + row[f"{key}_std"],
                         color=colour, alpha=0.1)
        if dp and len({r["epsilon"] for r in dp}) > 1:
            axis.set_xscale("log")
        axis.set_xlabel("epsilon")
        axis.set_ylabel(title + " (lower is better)")
        axis.set_title(f"{title} vs epsilon")
        axis.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def sample_rows(n: int, rows: int = SAMPLE_ROWS) -> np.ndarray:
    """`rows` prompt indices spread evenly over the set (held-out sets are often sorted by
    category, so the first rows would all be faces)."""
    return np.unique(np.linspace(0, n - 1, min(rows, n)).round().astype(int))


def samples_png(result: EvalResult, rows: int = SAMPLE_ROWS) -> bytes:
    labels = list(result.images)
    chosen = sample_rows(len(result.held_out.captions), rows)
    columns = [result.images[label][chosen] for label in labels]
    real = result.held_out.images[chosen]
    if real.shape[1:3] != columns[0].shape[1:3]:
        from PIL import Image

        side = columns[0].shape[1]
        real = np.stack([np.asarray(Image.fromarray(im).resize((side, side),
                                                                Image.Resampling.LANCZOS))
                         for im in real])
    grid = np.stack(columns + [real], axis=1)
    captions = [result.held_out.captions[i] for i in chosen]
    captions = [c if len(c) <= 28 else c[:27] + "…" for c in captions]
    return png_bytes(image_grid(grid, row_labels=captions,
                                column_labels=[_short(label) for label in labels] + ["real"]))


def images_npz(result: EvalResult) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{f"generated/{label}": images
                                   for label, images in result.images.items()},
                        real=result.held_out.images,
                        prompts=np.array(result.held_out.captions))
    return buffer.getvalue()


def _per_prompt(repeats: int) -> str:
    return ("one image" if repeats == 1 else
            f"{repeats} images (repeats with other diffusion seeds, all scored)")


def _content_guidance(plan: dict) -> str:
    value = plan.get("content_guidance")
    return "" if value is None else f" (split: content guidance {value})"


def _public_mix(plan: dict) -> str:
    public_lam = plan.get("public_lam")
    if public_lam is None or public_lam == plan["lam"]:
        return ""
    return (f"; public-only mixes its public neighbours at lam {public_lam:g} (its own), the "
            f"private settings at lam {plan['lam']:g}")


def _non_private_mix(plan: dict) -> str:
    k = plan.get("non_private_k") or plan["k"]
    lam = plan["lam"] if plan.get("non_private_lam") is None else plan["non_private_lam"]
    if (k, lam) == (plan["k"], plan["lam"]):
        return ""
    return (f"; non-private takes its own k {k} and lam {lam:g} (no noise: the k that DP's "
            f"sensitivity asks for need not be its best), the DP settings k {plan['k']} and "
            f"lam {plan['lam']:g}")


def _pooling(plan: dict) -> str:
    calls = ("one prompt per DP call" if plan["prompt_batch"] == 1
             else f"{plan['prompt_batch']} prompts per DP call")
    if not plan.get("pool", False):
        return f"; {calls}, DP releases used as released"
    if plan.get("style_prompts"):
        return (f"; {calls}, each experiment ledger first spent {plan['style_prompts']} of its "
                "queries on a style estimate (operator prompts) and every release was shrunk "
                "towards it (free)")
    if plan["prompt_batch"] == 1:
        return f"; {calls}: nothing to pool, DP releases used as released"
    return f"; {calls}, each call's releases pooled (shrunk towards their mean, free)"


def _short(label: str) -> str:
    return label.replace("DP eps=", "e").replace(" T=", "/").replace("public-only", "public") \
        .replace("non-private", "non-priv")


PRIVATE_REPORT_WARNING = (
    "This report folder holds real private images (the held-out set, in images.npz and "
    "samples.png) and NON-private generations: it is as sensitive as the private data set. It is "
    "written readable by its owner only; do not publish it.")


def write_report(result: EvalResult, out: str | Path) -> dict[str, str]:
    """Write every file of the report into `out` (created); returns name -> path.

    The folder (mode 0700) and its files (0600) are the owner's only: they hold real private
    images and non-private generations (:data:`PRIVATE_REPORT_WARNING`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(out, 0o700)
    files = {
        "runs.csv": csv_text(result.runs, result.notes.get("style_target")).encode(),
        "runs.json": (json.dumps({"runs": result.runs, "reference": result.notes["reference"],
                                  "plan": result.notes["plan"],
                                  "style_target": result.notes.get("style_target"),
                                  "domain": result.notes.get("domain")}, indent=1,
                                 default=_json_default) + "\n").encode(),
        "results.md": results_markdown(result).encode(),
        "fid_kid_vs_epsilon.png": plot_png(result.runs),
        "samples.png": samples_png(result),
        "images.npz": images_npz(result),
    }
    for name, data in files.items():
        write_bytes_atomically(out / name, data, mode=0o600)
    return {name: str(out / name) for name in files}


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
