"""Does a demo generator copy an UNSEEN style from its condition? Generators side by side.

Issue 18's question "where is the adaptation lost": in the condition (the encoder does not carry
the style) or in the generator (it does not draw what the condition carries)? Here the styles
are 20 procedural recipes of `dprdm.data.style_family` drawn with the seed no training uses
(987654), each applied to held-out-concept Twemoji images (public data only):

* condition = lam * (mean of 16 same-recipe image embeddings, non-private) + (1 - lam) * the
  text embedding of a caption of another held-out concept (8 prompts per recipe);
* score = the share of generated images whose nearest recipe centroid (mean embedding of 30
  images of each recipe, in the SAME encoder) is their own recipe; chance 1/20;
* `real` = the same score for real styled images (8 per recipe): the encoder's own ceiling.

lam 0 (text only) is the control: it must sit at chance. A generator that copies what its
condition carries scores near `real`; the ratio generated / real says how much of what the
encoder sees the generator draws.

    python bench/style_copy.py --out bench/results/style-copy.json   # v5 vs the issue-18 candidate
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from dprdm.data import load_folder
from dprdm.data.style_family import apply_recipe, style_family
from dprdm.encoders import load_encoder
from dprdm.encoders.evaluate import UNSEEN_RECIPE_SEED
from dprdm.generation.pipeline import RetrievalDiffusionPipeline
from results_file import write_results  # bench/results_file.py

console = Console()
PAIRS = {  # name -> (generator folder, encoder folder)
    "v5 (shipped until session 15)": ("checkpoints/v5/demo-generator",
                                      "checkpoints/v5/demo-encoder"),
    "issue-18 candidate": ("checkpoints/issue18/generator-8ch",
                           "checkpoints/issue18/encoder-family"),
}
RECIPES, SOURCES, NEIGHBOURS, PROMPTS = 20, 30, 16, 8
LAMS = (0.0, 0.5, 1.0)


def held_out_twemoji(root: Path) -> tuple[np.ndarray, list[str]]:
    """Twemoji images (64 px) and captions of the held-out concepts (never trained on)."""
    held = {row["concept"] for row in load_folder(root / "holdout", 64).extra}
    twemoji = load_folder(root / "data" / "twemoji", 64)
    mask = np.array([row["concept"] in held for row in twemoji.extra])
    return twemoji.images[mask], [c for c, m in zip(twemoji.captions, mask) if m]


def style_copy(model: str, encoder_dir: str, images: np.ndarray, captions: list[str],
               steps: int) -> dict[str, float]:
    encoder = load_encoder(encoder_dir)
    pipe = RetrievalDiffusionPipeline.from_pretrained(model)
    rng = np.random.default_rng(0)  # the same images and prompts for every pair
    recipes = style_family(RECIPES, UNSEEN_RECIPE_SEED)
    centroids, sources, prompts, real = [], [], [], []
    for recipe in recipes:
        rows = rng.choice(len(images), SOURCES + PROMPTS, replace=False)
        embedded = encoder.encode_images(apply_recipe(images[rows[:SOURCES]], recipe))
        centroids.append(embedded.mean(0) / np.linalg.norm(embedded.mean(0)))
        sources.append(embedded[:NEIGHBOURS].mean(0))
        prompts.append([captions[i] for i in rows[SOURCES:]])
        others = rng.choice(len(images), PROMPTS, replace=False)
        real.append(encoder.encode_images(apply_recipe(images[others], recipe)))
    centroid = np.stack(centroids)
    labels = np.repeat(np.arange(RECIPES), PROMPTS)

    def score(embeddings: np.ndarray) -> float:
        return float(((embeddings @ centroid.T).argmax(1) == labels).mean())

    result = {"real": score(np.concatenate(real))}
    for lam in LAMS:
        conditions = np.concatenate([lam * sources[j][None, :] + (1 - lam) *
                                     encoder.encode_text(prompts[j]) for j in range(RECIPES)])
        generated = pipe(conditions.astype(np.float32), guidance=3.0, steps=steps,
                         generator=torch.Generator().manual_seed(0))
        result[f"lam {lam:g}"] = score(encoder.encode_images(generated))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(".dprdm-demo"),
                        help="what `make demo` prepared")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    images, captions = held_out_twemoji(args.data)
    rows = []
    for name, (model, encoder_dir) in PAIRS.items():
        if not Path(model).is_dir():
            console.print(f"skipped {name}: {model} is missing")
            continue
        rows.append({"pair": name, "generator": model, "encoder": encoder_dir,
                     **style_copy(model, encoder_dir, images, captions, args.steps)})
    table = Table(title=f"own-recipe share of generations, {RECIPES} unseen recipes "
                        f"(chance {1 / RECIPES:.0%})")
    for column in ["pair", "real (ceiling)"] + [f"lam {lam:g}" for lam in LAMS]:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["pair"], f"{row['real']:.1%}",
                      *[f"{row[f'lam {lam:g}']:.1%}" for lam in LAMS])
    console.print(table)
    write_results(args.out, {"recipes": RECIPES, "prompts_per_recipe": PROMPTS,
                             "neighbours": NEIGHBOURS, "steps": args.steps, "rows": rows},
                  console)


if __name__ == "__main__":
    main()
