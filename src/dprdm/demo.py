"""`make demo`: the end-to-end offline demo (python -m dprdm.demo).

1. Prepare the emoji demo domains (npm packages only) under .dprdm-demo/.
2. Embed them with the shipped demo encoder; build the PRIVATE OpenMoji index with its ledger
   (epsilon 10, delta 1e-5) and the mechanism calibrated so that DEMO_QUERIES queries fit, and the
   PUBLIC (Twemoji + Noto) index. Both record the image tower (``conditioning_space.json``), so
   ``--demo`` with another encoder is refused instead of searching vectors of another space.
3. Generate, for a few held-out OpenMoji concepts, public-only and DP-RDM images side by side, and
   print where they are and how much budget was spent.

Re-running reuses the data, indexes and ledger (the ledger keeps counting: each run spends
len(DEMO_PROMPTS) more queries). The demo never re-creates a ledger for an existing private index:
if the index's ledger is gone (or unusable), it deletes the index and builds a NEW one from scratch
(a new index is a new data set with a new budget), and says so; the same when the index was
embedded with another image tower (a retrained shipped encoder) or from other images.
"""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
from rich.console import Console

from dprdm import demo_layout
from dprdm.errors import BudgetExceededError, DprdmError
from dprdm.privacy import MechanismParams, accounting, init_budget, open_private_index
from dprdm.privacy.binding import binding_of

console = Console()

EPSILON, DELTA, DEMO_QUERIES = 10.0, 1e-5, 1000
# The mechanism: many neighbours keep the noise small (sensitivity 2/k); see docs/results.md.
DEMO_K, DEMO_Q, DEMO_LAM = 40, 0.1, 0.75
# `dprdm eval --demo`'s non-private reference row takes its own k, chosen on the validation
# domains (no noise, so DP's k need not be its best; docs/results.md). Not a private setting.
DEMO_NON_PRIVATE_K = 600
STYLE_ESTIMATE_PROMPTS = 64  # queries the demo operator spends once on its style estimate
N_PROMPTS, IMAGES_PER_PROMPT, SEED = 8, 3, 0
IMAGE_SIZE = 64
# An index from before the demo recorded its image tower is reused only when its first rows
# embed again to the same vectors (float16 storage keeps cosines far above this).
RECHECK_ROWS, RECHECK_COSINE = 16, 0.999


def load_folders(folders, keep=None):
    """Images (at IMAGE_SIZE), ids (``FOLDER/FILE``) and metadata (with the caption) of the rows
    of `folders` that `keep` (a predicate on a row's metadata) accepts; the demo's indexes and
    the validation domains' (:mod:`dprdm.validation`) are built from these."""
    from dprdm.data import load_folder

    images, ids, metadata = [], [], []
    for folder in folders:
        dataset = load_folder(folder, IMAGE_SIZE, show_progress=False)
        chosen = [i for i, extra in enumerate(dataset.extra) if keep is None or keep(extra)]
        images.append(dataset.images[chosen])
        ids += [f"{folder.name}/{dataset.ids[i]}" for i in chosen]
        metadata += [dict(dataset.extra[i], caption=dataset.captions[i]) for i in chosen]
    return np.concatenate(images), ids, metadata


def _embedded_with(index, folders, encoder, space) -> bool:
    """Was `index` embedded from `folders` with this encoder? The image tower it records says;
    an index built before the demo recorded one is checked by embedding its first
    ``RECHECK_ROWS`` images again."""
    from dprdm.generation.backends.base import ConditioningSpace

    recorded = ConditioningSpace.load(index.path)
    if recorded is not None:
        return recorded.fingerprint == space.fingerprint
    images, ids, _ = load_folders(folders)
    if index.n != len(ids) or [str(i) for i in index.ids] != ids:
        return False
    rows = np.arange(min(RECHECK_ROWS, index.n))
    again = np.asarray(encoder.encode_images(images[rows]), dtype=np.float32)
    again /= np.maximum(np.linalg.norm(again, axis=1, keepdims=True), 1e-12)
    return bool(np.all(np.sum(again * index.rows_float32(rows), axis=1) > RECHECK_COSINE))


def _build_index_from_folder(folders, out_dir, encoder, what: str):
    """The demo's `what` index of `folders` embedded with `encoder`, recording its image tower
    (so that a generator with another tower is refused). An existing index is reused when it
    was embedded with the same tower (and, when it recorded none, from the same images), else
    deleted (and said so) and built again: a private one then becomes a new data set with a
    new budget."""
    from dprdm.generation.backends.base import SPACE_FILE
    from dprdm.generation.backends.demo import encoder_space
    from dprdm.retrieval import EmbeddingIndex, build_index

    space = encoder_space(encoder)
    if (out_dir / "index.json").exists():
        index = EmbeddingIndex.open(out_dir)
        if _embedded_with(index, folders, encoder, space):
            if not (out_dir / SPACE_FILE).exists():
                space.save(out_dir)  # checked above by embedding again: record it
            console.print(f"{what} index: reusing {out_dir} ({index.n} records)")
            return index
        console.print(f"[yellow]{what} index {out_dir} was embedded from other images or with "
                      f"another image tower than this demo's encoder: deleting it and building "
                      f"a new one"
                      + (" (a new data set with a new budget: the old ledger goes with it)[/]"
                         if what == "private" else "[/]"))
        shutil.rmtree(out_dir)
    images, ids, metadata = load_folders(folders)
    index = build_index(encoder.encode_images(images), out_dir, ids=ids, metadata=metadata,
                        extra_files={SPACE_FILE: space.to_bytes()})
    console.print(f"{what} index: built {out_dir} ({index.n} records, d={index.dim})")
    return index


def _usable_private_index(private) -> bool:
    """Does the private index exist with a verified ledger? Deletes it (and says so) when it
    exists but its ledger is missing or unusable: the demo never re-creates a ledger."""
    if not (private / "index.json").exists():
        return False
    if binding_of(private) is None and not (private / "ledger.sqlite").exists():
        return True  # built, never had a ledger: `budget init` below
    try:
        open_private_index(private)
        return True
    except DprdmError as error:
        console.print(f"[yellow]private index {private}: {error}[/]")
        console.print("[yellow]the demo does not re-create a ledger for an existing private "
                      "index (that would re-arm the budget): it deletes the index and builds a "
                      "NEW one from scratch (a new index is a new data set, with a new "
                      "budget)[/]")
        shutil.rmtree(private)
        return False


def prepare_indexes(encoder) -> None:
    root = demo_layout.demo_root()
    data = root / "data"
    private = demo_layout.private_index_dir()
    _usable_private_index(private)
    _build_index_from_folder([data / "openmoji_private"], private, encoder, "private")
    _build_index_from_folder([data / "twemoji", data / "google"], demo_layout.public_index_dir(),
                             encoder, "public")
    if binding_of(private) is None:
        sigma = accounting.calibrate_sigma(EPSILON, DEMO_Q, DEMO_K, DEMO_QUERIES, DELTA)
        init_budget(private, EPSILON, DELTA, MechanismParams(sigma, DEMO_Q, DEMO_K), DEMO_LAM)
    _, ledger = open_private_index(private)
    params = ledger.mechanism
    capacity = accounting.max_queries(params, EPSILON, DELTA)
    console.print(
        f"mechanism (pinned in the ledger): k={params.k} q={params.q} sigma={params.sigma:.4f} "
        f"lam={ledger.lam} (noise multiplier {params.noise_multiplier:.2f}); {capacity} queries "
        f"fit in epsilon={EPSILON:g}, delta={DELTA:g}"
    )
    if ledger.lam != DEMO_LAM:  # pinned by an older dprdm; the budget is never re-armed for it
        console.print(f"[yellow]this index's ledger pins lam={ledger.lam}, from an older dprdm; "
                      f"the demo's mix is now lam={DEMO_LAM} (docs/results.md): pass --lam "
                      f"{DEMO_LAM} to generate/eval/serve (free), or delete .dprdm-demo and run "
                      "`make demo` again (a new index with a new budget)[/]")


def held_out_prompts(n: int) -> list[str]:
    rows = [json.loads(line) for line in
            (demo_layout.holdout_dir() / "captions.jsonl").read_text().splitlines() if line]
    rng = np.random.default_rng(SEED)
    chosen = rng.choice(len(rows), size=min(n, len(rows)), replace=False)
    return [rows[i]["caption"] for i in sorted(chosen)]


def style_estimate_prompts(count: int = STYLE_ESTIMATE_PROMPTS) -> list[str]:
    """The demo operator's prompts for its style estimate: `count` captions of the PUBLIC index,
    none of them a held-out prompt (those are the evaluation's), chosen with a fixed seed."""
    held_out = {json.loads(line)["caption"] for line in
                (demo_layout.holdout_dir() / "captions.jsonl").read_text().splitlines() if line}
    metadata = demo_layout.require(demo_layout.public_index_dir()) / "metadata.jsonl"
    captions = sorted({json.loads(line)["caption"] for line in metadata.read_text().splitlines()
                       if line} - held_out)
    chosen = np.random.default_rng(SEED).choice(len(captions), size=count, replace=False)
    return [captions[i] for i in sorted(chosen)]


def prepare_style_estimate(rag, private) -> None:
    """Spend STYLE_ESTIMATE_PROMPTS queries once on the demo's style estimate (kept after)."""
    from dprdm.style_estimate import estimate_style, load_style_estimate, save_style_estimate

    estimate = load_style_estimate(private, rag.ledger.ledger_id, rag.mechanism.dim)
    if estimate is None:
        try:
            estimate = estimate_style(rag, style_estimate_prompts(), caller="make demo")
        except BudgetExceededError:  # refused whole: nothing was spent
            console.print("[yellow]style estimate: the demo's budget cannot pay for it any "
                          "more; releases are used as drawn (delete .dprdm-demo for a new "
                          "index and budget)[/]")
            return
        save_style_estimate(private, estimate)
        console.print(f"style estimate: spent {estimate.releases} queries on public captions "
                      f"(stored in {private}; one-prompt calls are shrunk towards it)")
    rag.style_estimate = estimate


def main() -> None:
    from dprdm.data.emoji import DEMO_SPLITS, prepare_demo_data
    from dprdm.encoders import load_encoder
    from dprdm.generation import RetrievalDiffusionPipeline
    from dprdm.generation.pipeline import DEFAULT_DIR
    from dprdm.image_files import image_grid, save_png
    from dprdm.rdm import MechanismSettings, RetrievalAugmentedGenerator
    from dprdm.retrieval import EmbeddingIndex

    started = time.perf_counter()
    console.rule("[bold]dprdm demo")
    root = demo_layout.demo_root()
    prepare_demo_data(root, splits=DEMO_SPLITS)
    encoder = load_encoder("demo")
    prepare_indexes(encoder)

    private_index, ledger = open_private_index(demo_layout.private_index_dir())
    rag = RetrievalAugmentedGenerator(
        encoder, RetrievalDiffusionPipeline.from_pretrained(DEFAULT_DIR),
        private_index=private_index, ledger=ledger,
        settings=MechanismSettings.from_ledger(ledger),
        public_index=EmbeddingIndex.open(demo_layout.public_index_dir()),
    )
    prepare_style_estimate(rag, demo_layout.private_index_dir())
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
        f"{spent['ledger_now']['epsilon_spent']:.4f} of {spent['epsilon_budget']:g} "
        f"over {spent['ledger_now']['queries']} queries (delta {spent['delta']:g})"
    )
    console.print(f"done in {time.perf_counter() - started:.0f} s; try: "
                  f".venv/bin/dprdm generate \"red apple\" --demo -n 4 --out out/")


if __name__ == "__main__":
    main()
