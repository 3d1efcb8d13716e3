"""Generator speed on this machine: images per second, and training cost of the building blocks.

    python bench/generate.py --out bench/results/generate.json             # sampling speed
    python bench/generate.py --blocks --out bench/results/blocks.json      # + training-step cost

Sampling: the pipeline (``--weights``, default the shipped demo generator) generates batches of
random unit conditions with classifier-free guidance (two network passes per step, batched) for
each (batch size, steps) pair; reported as images per second and seconds per image.

``--blocks``: seconds per training step (forward + backward + Adam, batch ``--train-batch``) of
(a) the latent denoiser as shipped, (b) a diffusers ``UNet2DModel`` of the same widths (GroupNorm,
attention at the low resolution), and (c) four 3 x 3 residual blocks at the autoencoder's and
the denoiser's resolutions with no normalisation, our per-pixel RMS norm, and GroupNorm(32).
Numbers on a shared machine move with its load; the table prints the load average too.

``--adaptation DATA``: the qualitative adaptation check (non-private: no subsampling, no ledger;
the noise is plain Gaussian) on the demo data. For the first ``--prompts`` held-out OpenMoji
captions it builds, per caption, the conditions generation would see: text alone (lam = 0); the
mean of the k nearest PRIVATE OpenMoji image embeddings (by the caption's text embedding) plus
N(0, sigma^2) at lam = 0.5 and 1; the same from the PUBLIC Twemoji index at lam = 0.5. It writes a
grid (rows: held-out truth, then one row per condition kind) and reports, per kind, the share of
generated images whose encoder image embedding lies nearest the OpenMoji centroid (vs the Twemoji
and Noto centroids): a rough style probe, only as good as the encoder's style direction.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from dprdm.generation import DEFAULT_DIR, LatentDenoiser, RetrievalDiffusionPipeline
from dprdm.generation.layers import rms_norm
from results_file import write_results  # bench/results_file.py

console = Console()


def sampling(pipe: RetrievalDiffusionPipeline, batches: list[int], steps_list: list[int],
             guidance: float, repeats: int) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for steps in steps_list:
        for batch in batches:
            c = rng.standard_normal((batch, pipe.cond_dim)).astype(np.float32)
            pipe(c[:1], guidance=guidance, steps=2)  # warm-up
            times = []
            for r in range(repeats):
                tic = time.perf_counter()
                pipe(c, guidance=guidance, steps=steps, generator=torch.Generator().manual_seed(r),
                     batch_size=batch)
                times.append(time.perf_counter() - tic)
            best = min(times)
            rows.append({"steps": steps, "batch": batch, "guidance": guidance,
                         "seconds": round(best, 4), "images_per_s": round(batch / best, 3),
                         "s_per_image": round(best / batch, 4)})
    return rows


def _train_step_seconds(model: nn.Module, inputs: tuple, call, repeats: int) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    for i in range(repeats + 1):
        tic = time.perf_counter()
        loss = call(model, *inputs).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - tic)
    return float(np.median(times))


class _NormBlock(nn.Module):
    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.c2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = norm
        self.g1, self.g2 = nn.GroupNorm(32, channels), nn.GroupNorm(32, channels)

    def _n(self, x: torch.Tensor, group_norm: nn.Module) -> torch.Tensor:
        if self.norm == "rms":
            return rms_norm(x)
        if self.norm == "groupnorm":
            return group_norm(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c2(F.silu(self._n(self.c1(F.silu(self._n(x, self.g1))), self.g2)))


def blocks(pipe: RetrievalDiffusionPipeline | None, batch: int, repeats: int) -> list[dict]:
    from diffusers import UNet2DModel

    rows = []
    config = dict(pipe.denoiser.config) if pipe is not None else {}
    kwargs = {k: config[k] for k in ("latent_channels", "latent_size", "cond_dim", "channels",
                                     "blocks", "attention", "middle_blocks", "emb_dim",
                                     "cond_map_channels", "heads") if k in config}
    ours = LatentDenoiser(**kwargs)
    ch, size, d = ours.config.latent_channels, ours.config.latent_size, ours.config.cond_dim
    x, t, c = torch.randn(batch, ch, size, size), torch.randint(0, 1000, (batch,)), \
        torch.randn(batch, d)
    widths = tuple(ours.config.channels)
    attn = len(widths) - 1
    theirs = UNet2DModel(sample_size=size, in_channels=ch, out_channels=ch,
                         block_out_channels=widths, layers_per_block=max(ours.config.blocks),
                         down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * attn,
                         up_block_types=("AttnUpBlock2D",) * attn + ("UpBlock2D",),
                         norm_num_groups=32)
    for name, model, call in (
            ("dprdm LatentDenoiser (no GroupNorm)", ours, lambda m, x, t, c: m(x, t, c)),
            ("diffusers UNet2DModel (GroupNorm)", theirs, lambda m, x, t, c: m(x, t).sample)):
        rows.append({"what": name, "params_M": round(sum(p.numel() for p in model.parameters())
                                                     / 1e6, 2), "batch": batch,
                     "s_per_step": round(_train_step_seconds(model, (x, t, c), call, repeats), 4)})
    # the next lever for thin lines (generator.md item 15): a 16 x 16 x 4 latent (the same
    # numbers as 8 x 8 x 16), one more U-Net level, attention still at 4 x 4 only
    wide = LatentDenoiser(latent_channels=4, latent_size=2 * size, cond_dim=d,
                          channels=(64,) + widths, blocks=(1,) * (len(widths) + 1),
                          attention=(False,) * len(widths) + (True,))
    inputs = (torch.randn(batch, 4, 2 * size, 2 * size), t, c)
    rows.append({"what": f"dprdm LatentDenoiser at a {2 * size}x{2 * size}x4 latent",
                 "params_M": round(sum(p.numel() for p in wide.parameters()) / 1e6, 2),
                 "batch": batch, "s_per_step": round(_train_step_seconds(
                     wide, inputs, lambda m, x, t, c: m(x, t, c), repeats), 4)})
    for channels, res, b in ((64, 32, 32), (128, 8, batch)):
        for norm in ("none", "rms", "groupnorm"):
            net = nn.Sequential(*[_NormBlock(channels, norm) for _ in range(4)])
            inp = torch.randn(b, channels, res, res)
            rows.append({"what": f"4 res-blocks {channels}ch @{res}x{res}, norm={norm}",
                         "params_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
                         "batch": b, "s_per_step": round(
                             _train_step_seconds(net, (inp,), lambda m, i: m(i), repeats), 4)})
    return rows


def adaptation(pipe: RetrievalDiffusionPipeline, data: Path, encoder_name: str, prompts: int,
               k: int, sigma: float, guidance: float, steps: int, grid: Path) -> dict:
    from dprdm.data import load_folder
    from dprdm.generation.training import load_training_encoder, save_grid

    size = pipe.image_size
    encoder = load_training_encoder(encoder_name)
    private = load_folder(data / "data" / "openmoji_private", size, show_progress=False)
    public = load_folder(data / "data" / "twemoji", size, show_progress=False)
    google = load_folder(data / "data" / "google", size, show_progress=False)
    holdout = load_folder(data / "holdout", size, show_progress=False)
    take = np.random.default_rng(0).choice(len(holdout), min(prompts, len(holdout)),
                                           replace=False)
    captions = [holdout.captions[i] for i in take]
    emb = {name: encoder.encode_images(ds.images)
           for name, ds in (("openmoji", private), ("twemoji", public), ("google", google))}
    text = encoder.encode_text(captions)
    rng = np.random.default_rng(0)

    def released(index: np.ndarray) -> np.ndarray:
        top = np.argsort(-(text @ index.T), axis=1)[:, :k]
        mean = index[top].mean(axis=1)
        return (mean + sigma * rng.standard_normal(mean.shape)).astype(np.float32)

    r_private, r_public = released(emb["openmoji"]), released(emb["twemoji"])
    kinds = {"text only (lam=0)": text,
             "private OpenMoji retrieval, lam=0.5": 0.5 * r_private + 0.5 * text,
             "private OpenMoji retrieval, lam=1": r_private,
             "public Twemoji retrieval, lam=0.5": 0.5 * r_public + 0.5 * text}
    centroids = np.stack([e.mean(0) / np.linalg.norm(e.mean(0)) for e in emb.values()])
    rows, report = [holdout.images[take]], {}
    for name, cond in kinds.items():
        images = pipe(cond.astype(np.float32), guidance=guidance, steps=steps,
                      generator=torch.Generator().manual_seed(0))
        rows.append(images)
        nearest = np.argmax(encoder.encode_images(images) @ centroids.T, axis=1)
        report[name] = {"openmoji_style_share": round(float(np.mean(nearest == 0)), 3),
                        "twemoji_style_share": round(float(np.mean(nearest == 1)), 3),
                        "google_style_share": round(float(np.mean(nearest == 2)), 3)}
    save_grid(np.concatenate(rows), grid, cols=len(take), scale=3)
    truth = np.argmax(encoder.encode_images(holdout.images[take]) @ centroids.T, axis=1)
    report["held-out truth (real OpenMoji)"] = {
        "openmoji_style_share": round(float(np.mean(truth == 0)), 3)}
    return {"captions": captions, "k": k, "sigma": sigma, "guidance": guidance, "steps": steps,
            "grid": str(grid), "rows": ["held-out truth", *kinds], "style": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--blocks", action="store_true", help="also time training steps")
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--adaptation", type=Path, default=None, metavar="DATA",
                        help="demo root: write the adaptation grid and style shares")
    parser.add_argument("--encoder", default="demo")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=0.05)
    parser.add_argument("--grid", type=Path, default=Path("bench/results/adaptation.png"))
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = RetrievalDiffusionPipeline.from_pretrained(args.weights) \
        if (args.weights / "model_index.json").is_file() else None
    result = {"machine": {"cpu": platform.processor() or platform.machine(),
                          "threads": args.threads, "torch": torch.__version__,
                          "load_average_1m": os.getloadavg()[0]},
              "weights": str(args.weights)}
    if pipe is not None and args.batches and args.batches[0] > 0:
        result["sampling"] = sampling(pipe, args.batches, args.steps, args.guidance, args.repeats)
        table = Table(title=f"generation ({args.threads} thread(s), guidance {args.guidance})")
        for column in ("steps", "batch", "seconds", "images/s", "s/image"):
            table.add_column(column, justify="right")
        for row in result["sampling"]:
            table.add_row(str(row["steps"]), str(row["batch"]), f"{row['seconds']:.3f}",
                          f"{row['images_per_s']:.2f}", f"{row['s_per_image']:.4f}")
        console.print(table)
    else:
        console.print(f"[yellow]no weights at {args.weights}: skipping sampling[/]")
    if args.blocks:
        result["blocks"] = blocks(pipe, args.train_batch, args.repeats + 1)
        table = Table(title="training step (forward + backward + Adam)")
        for column in ("what", "params (M)", "batch", "s/step"):
            table.add_column(column, justify="right" if column != "what" else "left")
        for row in result["blocks"]:
            table.add_row(row["what"], f"{row['params_M']:.2f}", str(row["batch"]),
                          f"{row['s_per_step']:.3f}")
        console.print(table)
    if args.adaptation is not None and pipe is not None:
        result["adaptation"] = adaptation(pipe, args.adaptation, args.encoder, args.prompts,
                                          args.k, args.sigma, args.guidance, max(args.steps),
                                          args.grid)
        table = Table(title=f"adaptation (k={args.k}, sigma={args.sigma}; grid {args.grid})")
        table.add_column("condition")
        table.add_column("nearest style centroid: openmoji / twemoji / google", justify="right")
        for name, shares in result["adaptation"]["style"].items():
            table.add_row(name, " / ".join(f"{v:.2f}" for v in shares.values()))
        console.print(table)
    result["machine"]["load_average_1m_after"] = os.getloadavg()[0]
    console.print(f"load average (1 min) before/after: {result['machine']['load_average_1m']:.2f}"
                  f" / {result['machine']['load_average_1m_after']:.2f}")
    write_results(args.out, result, console)


if __name__ == "__main__":
    main()
