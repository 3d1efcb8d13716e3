"""Scoring a synthesis job against held-out images: ``dprdm eval --synthetic JOBDIR --holdout DIR``.

Nothing is generated and nothing is charged: the job's images (read from its imagefolder) are
scored with the evaluation harness's own :func:`~dprdm.evaluation.harness.score` -- FID / KID /
PRDC against the held-out images, text-image alignment against each image's own prompt, and, on
the emoji demo data, the concept and style scores.
"""

from __future__ import annotations

import json
from pathlib import Path

from dprdm.errors import InvalidParameterError, NotFoundError
from dprdm.files import write_bytes_atomically
from dprdm.synthesis.journal import Journal
from dprdm.synthesis.output import DATA_DIR, METADATA_FILE

SCORES_FILE = "synthetic_scores.json"


def score_job(job_dir: Path, holdout_dir: Path, encoder, image_size: int, classifiers=None,
              extractor=None, kid_subsets: int = 100, seed: int = 0) -> dict:
    from dprdm.data import load_folder
    from dprdm.evaluation.harness import EvalPlan, HeldOut, feature_space, score
    from dprdm.evaluation.metrics import EncoderImageFeatures

    job_dir = Path(job_dir)
    if not Journal.exists(job_dir):
        raise NotFoundError(f"{job_dir} is not a `dprdm synthesize` job folder (no journal)")
    journal = Journal(job_dir)
    counts, params = journal.counts(), journal.params
    journal.close()
    if not (job_dir / DATA_DIR / METADATA_FILE).is_file() or counts["images_done"] < 2:
        raise InvalidParameterError(f"{job_dir} has fewer than 2 finished images to score")
    job = load_folder(job_dir / DATA_DIR, image_size, captions=METADATA_FILE,
                      caption_column="prompt", show_progress=False)
    held = load_folder(holdout_dir, image_size, show_progress=False)
    if extractor is None:
        extractor = classifiers if classifiers is not None else EncoderImageFeatures(encoder)
    plan = EvalPlan(kid_subsets=kid_subsets, seed=seed)
    # score() reads captions per generated image: the job's own prompts, one per image.
    row = score(job.images, HeldOut(held.images, list(job.captions)), classifiers, encoder,
                extractor, plan)
    complete = counts["images_done"] == counts["prompts"] * params["images_per_prompt"]
    return {"job_id": params["job_id"], "images_scored": len(job.images),
            "held_out_images": len(held.images), "job_complete": complete,
            "mechanism": params["mechanism"], "scores": row,
            "feature_space": feature_space(extractor),
            "demo_metrics": classifiers is not None}


def write_scores(result: dict, out: Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(out / SCORES_FILE, (json.dumps(result, indent=1) + "\n").encode())
    return out / SCORES_FILE


def score_synthetic_cli(job_dir: Path, holdout: Path | None, demo: bool, out: Path,
                        encoder_name: str, model: Path | None, classifiers_dir: Path | None,
                        inception: Path | None, seed: int) -> dict:
    """What ``dprdm eval --synthetic`` runs: the demo's classifiers only on demo data."""
    from dprdm import demo_layout
    from dprdm.encoders import load_encoder
    from dprdm.evaluation.classifiers import DEFAULT_DIR as CLASSIFIERS_DIR
    from dprdm.evaluation.classifiers import EvalClassifiers
    from dprdm.evaluation.metrics import inception_extractor
    from dprdm.generation import RetrievalDiffusionPipeline
    from dprdm.generation.pipeline import DEFAULT_DIR

    if holdout is None and demo:
        holdout = demo_layout.require(demo_layout.holdout_dir())
    if holdout is None:
        raise InvalidParameterError("give --holdout DIR (or --demo) with --synthetic")
    if not Journal.exists(job_dir):
        raise NotFoundError(f"{job_dir} is not a `dprdm synthesize` job folder (no journal)")
    params = Journal(job_dir).params
    on_demo = demo or Path(params["index"]) == demo_layout.private_index_dir().resolve()
    classifiers = (EvalClassifiers.from_pretrained(classifiers_dir or CLASSIFIERS_DIR)
                   if on_demo or classifiers_dir is not None else None)
    model_dir = Path(model or DEFAULT_DIR)
    if not (model_dir / "model_index.json").is_file():
        raise NotFoundError(f"no generator pipeline (model_index.json) in {model_dir}")
    image_size = RetrievalDiffusionPipeline.from_pretrained(str(model_dir)).image_size
    result = score_job(job_dir, holdout, load_encoder(encoder_name), image_size, classifiers,
                       inception_extractor(inception) if inception is not None else None,
                       seed=seed)
    result["file"] = str(write_scores(result, out))
    return result
