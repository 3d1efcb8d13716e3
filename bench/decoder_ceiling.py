"""The decoder's ceiling: how much of an unseen style survives an encode/decode round trip.

Whatever the denoiser draws comes out of the autoencoder's decoder, so a style the round trip
loses no generator can show (issue 18). For each autoencoder, side by side on the same images:

* reconstruction MSE (0-1 pixels, posterior mean decoded) of styles no generator trained on:
  Fluent High Contrast (the validation domain's held-out set), EmojiOne 2 (the earlier
  validation domain) and 20 procedural recipes drawn with the seed no training uses, applied to
  held-out-concept Twemoji -- all public: CHOOSE on these;
* the share of round trips each style's strict judge still calls that style, next to the share
  of the real images (the judge's own ceiling): Fluent High Contrast and EmojiOne with the
  validation judges, OpenMoji's held-out set with the strict OpenMoji judge -- OpenMoji is a
  REPORT, never a criterion.

    python bench/decoder_ceiling.py --out bench/results/decoder-ceiling.json
    python bench/decoder_ceiling.py --autoencoder NAME=DIR ...    # DIR: a pipeline or autoencoder
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
from dprdm.encoders.evaluate import UNSEEN_RECIPE_SEED
from dprdm.demo_layout import validation_holdout_dir
from dprdm.evaluation.train_classifiers import autoencoder_reconstructions
from dprdm.generation.autoencoder import Autoencoder
from results_file import write_results  # bench/results_file.py
from strict_judges import openmoji_judge, validation_judge  # bench/strict_judges.py

console = Console()
AUTOENCODERS = {  # name -> a pipeline folder (its autoencoder/) or an autoencoder folder
    "v5 (shipped until session 15)": "checkpoints/v5/demo-generator",
    "issue-18 8 channels": "checkpoints/issue18/generator-8ch",
    "issue-18 deeper decoder": "checkpoints/issue18/generator-8ch-split-dec",
}
RECIPES, PER_RECIPE = 20, 24


def load_autoencoder(folder: str) -> Autoencoder:
    path = Path(folder)
    path = path / "autoencoder" if (path / "autoencoder").is_dir() else path
    return Autoencoder.from_pretrained(path, low_cpu_mem_usage=False).float().eval()


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float((((a.astype(np.float32) - b.astype(np.float32)) / 255) ** 2).mean())


def styles(root: Path) -> dict[str, dict]:
    """name -> images and (for the judged styles) a probability function of their judge."""
    held = {row["concept"] for row in load_folder(root / "holdout", 32,
                                                  show_progress=False).extra}
    twemoji = load_folder(root / "data" / "twemoji", 32, show_progress=False)
    base = twemoji.images[[row["concept"] in held for row in twemoji.extra]]
    rng = np.random.default_rng(0)
    procedural = np.concatenate([
        apply_recipe(base[rng.choice(len(base), PER_RECIPE, replace=False)], recipe)
        for recipe in style_family(RECIPES, UNSEEN_RECIPE_SEED)])
    folder = validation_holdout_dir(root, "fluent_hc")
    return {
        "Fluent High Contrast": {
            "images": load_folder(folder, 32, show_progress=False).images,
            "judge": validation_judge("fluent_hc")},
        "EmojiOne 2": {
            "images": load_folder(root / "data" / "emojione", 32, show_progress=False).images,
            "judge": validation_judge("emojione")},
        f"{RECIPES} unseen recipes": {"images": procedural, "judge": None},
        "OpenMoji (report)": {
            "images": load_folder(root / "holdout", 32, show_progress=False).images,
            "judge": openmoji_judge()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(".dprdm-demo"),
                        help="what `make demo` prepared (plus the fluent_hc and emojione splits)")
    parser.add_argument("--autoencoder", action="append", default=[], metavar="NAME=DIR",
                        help="more autoencoders to compare (repeatable)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    chosen = dict(AUTOENCODERS)
    for item in args.autoencoder:
        name, _, folder = item.partition("=")
        chosen[name] = folder
    data = styles(args.data)
    real = {name: float((s["judge"](s["images"]) > 0.5).mean())
            for name, s in data.items() if s["judge"]}
    rows = []
    for name, folder in chosen.items():
        if not Path(folder).is_dir():
            console.print(f"skipped {name}: {folder} is missing")
            continue
        autoencoder = load_autoencoder(folder)
        row = {"autoencoder": name, "folder": folder,
               "decoder_blocks": list(autoencoder.config.decoder_blocks),
               "latent_channels": autoencoder.config.latent_channels}
        for style, s in data.items():
            recon = autoencoder_reconstructions(s["images"], autoencoder)
            row[f"{style} mse"] = mse(recon, s["images"])
            if s["judge"]:
                row[f"{style} judged"] = float((s["judge"](recon) > 0.5).mean())
        rows.append(row)
    table = Table(title="round trips of unseen styles: MSE (0-1 pixels) / strict judge's share "
                        "(real images in the header)")
    table.add_column("autoencoder")
    for style in data:
        header = f"{style}" + (f"\n(real {real[style]:.1%})" if style in real else "")
        table.add_column(header, justify="right")
    for row in rows:
        cells = [f"{row[f'{style} mse']:.5f}" + (f" / {row[f'{style} judged']:.1%}"
                                                 if f"{style} judged" in row else "")
                 for style in data]
        table.add_row(row["autoencoder"], *cells)
    console.print(table)
    write_results(args.out, {"images": {s: len(d["images"]) for s, d in data.items()},
                             "real_judged": real, "rows": rows}, console)


if __name__ == "__main__":
    main()
