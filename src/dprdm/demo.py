"""`make demo`: the end-to-end offline demo (python -m dprdm.demo).

1. Prepare the emoji demo domains (npm packages only) under .dprdm-demo/.
2. Embed them with the shipped demo encoder; build the PRIVATE OpenMoji index with its ledger
   (epsilon 10, delta 1e-5) and the mechanism calibrated so that DEMO_QUERIES queries fit, and the
   PUBLIC (Twemoji + Noto) index.
3. Generate, for a few held-out OpenMoji concepts, public-only and DP-RDM images side by side, and
   print where they are and how much budget was spent.

Re-running reuses the data, indexes and ledger (the ledger keeps counting: each run spends
len(DEMO_PROMPTS) more queries).
"""

from __future__ import annotations

import json
import time

import numpy as np
from rich.console import Console

from dprdm import demo_layout
from dprdm.privacy import SqliteLedger, accounting

console = Console()

EPSILON, DELTA, DEMO_QUERIES = 10.0, 1e-5, 1000
# The mechanism: many neighbours keep the noise small (sensitivity 2/k); see docs/results.md.
DEMO_K, DEMO_Q, DEMO_LAM = 40, 0.1, 0.5
N_PROMPTS, IMAGES_PER_PROMPT, SEED = 8, 3, 0
IMAGE_SIZE = 64


def _build_index_from_folder(folders, out_dir, encoder, what: str):
    from dprdm.data import load_folder
    from dprdm.retrieval import EmbeddingIndex, build_index

    if (out_dir / "index.json").exists():
        index = EmbeddingIndex.open(out_dir)
        console.print(f"{what} index: reusing {out_dir} ({index.n} records)")
        return index
    images, ids, metadata = [], [], []
    for folder in folders:
        dataset = load_folder(folder, IMAGE_SIZE, show_progress=False)
        images.append(dataset.images)
        ids += [f"{folder.name}/{i}" for i in dataset.ids]
        metadata += [dict(extra, caption=caption) for extra, caption
                     in zip(dataset.extra, dataset.captions)]
    embeddings = encoder.encode_images(np.concatenate(images))
    index = build_index(embeddings, out_dir, ids=ids, metadata=metadata)
    console.print(f"{what} index: built {out_dir} ({index.n} records, d={index.dim})")
    return index


def prepare_indexes(encoder) -> None:
    from dprdm.rdm import MechanismSettings

    root = demo_layout.demo_root()
    data = root / "data"
    _build_index_from_folder([data / "openmoji_private"], demo_layout.private_index_dir(),
                             encoder, "private")
    _build_index_from_folder([data / "twemoji", data / "google"], demo_layout.public_index_dir(),
                             encoder, "public")
    private = demo_layout.private_index_dir()
    if not (private / "ledger.sqlite").exists():
        SqliteLedger.create(private, epsilon=EPSILON, delta=DELTA)
    if not (private / "mechanism.json").exists():
        sigma = accounting.calibrate_sigma(EPSILON, DEMO_Q, DEMO_K, DEMO_QUERIES, DELTA)
        MechanismSettings(sigma, DEMO_Q, DEMO_K, DEMO_LAM).save(private)
    settings = MechanismSettings.load(private)
    capacity = accounting.max_queries(settings.params, EPSILON, DELTA)
    console.print(
        f"mechanism: k={settings.k} q={settings.q} sigma={settings.sigma:.4f} lam={settings.lam} "
        f"(noise multiplier {settings.params.noise_multiplier:.2f}); {capacity} queries fit in "
        f"epsilon={EPSILON:g}, delta={DELTA:g}"
    )


def held_out_prompts(n: int) -> list[str]:
    rows = [json.loads(line) for line in
            (demo_layout.holdout_dir() / "captions.jsonl").read_text().splitlines() if line]
    rng = np.random.default_rng(SEED)
    chosen = rng.choice(len(rows), size=min(n, len(rows)), replace=False)
    return [rows[i]["caption"] for i in sorted(chosen)]


def main() -> None:
    from dprdm.data.emoji import prepare_demo_data
    from dprdm.encoders import load_encoder
    from dprdm.generation import RetrievalDiffusionPipeline
    from dprdm.generation.pipeline import DEFAULT_DIR
    from dprdm.image_files import image_grid, save_png
    from dprdm.rdm import MechanismSettings, RetrievalAugmentedGenerator
    from dprdm.retrieval import EmbeddingIndex

    started = time.perf_counter()
    console.rule("[bold]dprdm demo")
    root = demo_layout.demo_root()
    prepare_demo_data(root)
    encoder = load_encoder("demo")
    prepare_indexes(encoder)

    private = demo_layout.private_index_dir()
    ledger = SqliteLedger(private)
    rag = RetrievalAugmentedGenerator(
        encoder, RetrievalDiffusionPipeline.from_pretrained(DEFAULT_DIR),
        private_index=EmbeddingIndex.open(private), ledger=ledger,
        settings=MechanismSettings.load(private),
        public_index=EmbeddingIndex.open(demo_layout.public_index_dir()),
    )
    prompts = held_out_prompts(N_PROMPTS)
    console.print(f"prompts (held-out OpenMoji concepts): {', '.join(prompts)}")
    public = rag.generate(prompts, n=IMAGES_PER_PROMPT, seed=SEED, public_only=True)
    private_run = rag.generate(prompts, n=IMAGES_PER_PROMPT, seed=SEED, caller="make demo")
    side_by_side = np.concatenate([public.images, private_run.images], axis=1)
    columns = [f"public {i + 1}" for i in range(IMAGES_PER_PROMPT)] + [
        f"DP-RDM {i + 1}" for i in range(IMAGES_PER_PROMPT)]
    out = root / "demo-output"
    out.mkdir(parents=True, exist_ok=True)
    grid_path = out / "public-vs-dp.png"
    save_png(grid_path, image_grid(side_by_side, row_labels=prompts, column_labels=columns))
    spent = private_run.report["ledger"]
    (out / "report.json").write_text(json.dumps(
        {"public_only": public.report, "dp": private_run.report}, indent=1) + "\n")
    console.rule("[bold]result")
    console.print(f"grid (rows: prompts; left: public-only, right: DP-RDM): {grid_path.resolve()}")
    console.print(
        f"privacy: this run spent epsilon {spent['epsilon_spent_by_call']:.4f} "
        f"({spent['queries_by_call']} queries); ledger total epsilon "
        f"{spent['after']['epsilon_spent']:.4f} of {spent['epsilon_budget']:g} "
        f"over {spent['after']['queries']} queries (delta {spent['delta']:g})"
    )
    console.print(f"done in {time.perf_counter() - started:.0f} s; try: "
                  f".venv/bin/dprdm generate \"red apple\" --demo -n 4 --out out/")


if __name__ == "__main__":
    main()
