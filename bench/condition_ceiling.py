"""The condition's ceiling: how much of a private style the generator draws from conditions
better than retrieval gives it (issue 18).

For each domain's held-out images, the shipped generator (split guidance at its recorded content
guidance, guidance 3, seed 0, one image per prompt) is conditioned, without any noise, on

* each held-out image's OWN image embedding (an oracle no retrieval reaches), mixed with the
  prompt's text embedding at lam 0.5 (the demo's mix) and at lam 1 (the image alone);
* the mean of 40 RANDOM images of the domain's private index (the style without any content),
  at lam 0.5 and 0.75;

and the images are scored as `dprdm eval` scores them: concept top-10 (the concept network) and
the share the domain's strict judge calls that style. Fluent High Contrast is the validation
domain (choose there); OpenMoji is a REPORT. Nothing here is private in the demo (OpenMoji is a
public data set playing "private"); on truly private data these rows would read private records
with no privacy at all, so this is a tool for the demo only.

    python bench/condition_ceiling.py --out bench/results/condition-ceiling.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from dprdm.data import load_folder
from dprdm.demo_layout import validation_holdout_dir, validation_private_index_dir
from dprdm.encoders import load_encoder
from dprdm.evaluation.classifiers import EvalClassifiers
from dprdm.evaluation.metrics import concept_scores
from dprdm.generation.pipeline import DEFAULT_DIR, RetrievalDiffusionPipeline
from dprdm.retrieval import EmbeddingIndex
from results_file import write_results  # bench/results_file.py
from strict_judges import openmoji_judge, validation_judge  # bench/strict_judges.py

console = Console()
K_RANDOM = 40


def domains(root: Path, classifiers: EvalClassifiers) -> dict[str, dict]:
    """name -> held-out folder, private index folder and the strict judge's probability."""
    return {
        "Fluent High Contrast (validation)": {
            "holdout": validation_holdout_dir(root, "fluent_hc"),
            "private": validation_private_index_dir(root, "fluent_hc"),
            "judge": validation_judge("fluent_hc")},
        "OpenMoji (report)": {
            "holdout": root / "holdout", "private": root / "private",
            "judge": openmoji_judge(classifiers)},
    }


def conditions(own: np.ndarray, text: np.ndarray, private: np.ndarray,
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    style = np.stack([private[rng.choice(len(private), K_RANDOM, replace=False)].mean(0)
                      for _ in range(len(text))])
    return {"own image, lam 0.5": 0.5 * own + 0.5 * text,
            "own image, lam 1": own,
            f"{K_RANDOM} random private, lam 0.5": 0.5 * style + 0.5 * text,
            f"{K_RANDOM} random private, lam 0.75": 0.75 * style + 0.25 * text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(".dprdm-demo"))
    parser.add_argument("--model", default=str(DEFAULT_DIR))
    parser.add_argument("--encoder", default="demo")
    parser.add_argument("--content-guidance", type=float, default=None,
                        help="default: the one the generator records")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder = load_encoder(args.encoder)
    pipe = RetrievalDiffusionPipeline.from_pretrained(args.model)
    content_guidance = (args.content_guidance if args.content_guidance is not None
                        else pipe.config.content_guidance)
    if content_guidance is None:
        raise SystemExit("give --content-guidance: the generator records none")
    concepts = EvalClassifiers.from_pretrained()
    rows = []
    for name, domain in domains(args.data, concepts).items():
        held = load_folder(domain["holdout"], encoder.load_size, show_progress=False)
        captions = list(held.captions)
        text = encoder.encode_text(captions)
        own = encoder.encode_images(held.images)
        index = EmbeddingIndex.open(domain["private"])
        private = index.rows_float32(np.arange(index.n))
        real = float(np.mean(domain["judge"](held.images) >= 0.5))  # judges resize to 32
        for label, cond in conditions(own, text, private, np.random.default_rng(0)).items():
            images = pipe(cond.astype(np.float32), guidance=3.0, steps=50,
                          generator=torch.Generator().manual_seed(0), content_conditions=text,
                          content_guidance=content_guidance)
            rows.append({"domain": name, "condition": label, "prompts": len(captions),
                         "concept_top10": concept_scores(images, captions,
                                                         concepts)["concept_top10"],
                         "judged": float(np.mean(domain["judge"](images) >= 0.5)),
                         "real_judged": real})
            console.print(f"{name}: {label}: top-10 {100 * rows[-1]['concept_top10']:.1f} %, "
                          f"judged {100 * rows[-1]['judged']:.1f} %")
    table = Table(title=f"the generator's ceiling by condition (guidance 3, content guidance "
                        f"{content_guidance:g}, no noise)")
    for column in ("domain", "condition", "concept top-10", "strict judge (real)"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["domain"], row["condition"], f"{100 * row['concept_top10']:.1f} %",
                      f"{100 * row['judged']:.1f} % ({100 * row['real_judged']:.1f} %)")
    console.print(table)
    write_results(args.out, {"model": args.model, "encoder": args.encoder,
                             "content_guidance": content_guidance, "rows": rows}, console)


if __name__ == "__main__":
    main()
