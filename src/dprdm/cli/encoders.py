"""`dprdm encoders ...`: describe an encoder, embed data with it, train/evaluate the demo one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import typer

from dprdm.cli.output import JSON_OPTION, run_command
from dprdm.errors import InvalidParameterError

app = typer.Typer(help="Text/image encoders: inspect, embed, train and evaluate the demo one.",
                  no_args_is_help=True)

ENCODER_OPTION = typer.Option("demo", "--encoder",
                              help="'demo' (shipped) or a local CLIP / demo-encoder directory.")


def _offline() -> None:
    """Encoders load from local files only; make sure no library tries the hub either."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _read_texts(path: Path) -> tuple[list[str], list[str]]:
    """(texts, ids) from a .txt (one per line, ids = line numbers) or .jsonl (``caption``)."""
    if not path.is_file():
        raise InvalidParameterError(f"no texts file at {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix.lower() == ".jsonl":
        texts, ids = [], []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                texts.append(str(row["caption"]))
            except (ValueError, KeyError, TypeError):
                raise InvalidParameterError(f"{path}:{number}: expected a JSON object with a "
                                            "'caption' field") from None
            ids.append(str(row.get("file", row.get("id", number - 1))))
        return texts, ids
    return lines, [str(i) for i in range(len(lines))]


@app.command()
def info(encoder: str = ENCODER_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Load an encoder and describe it (backend, embedding dimension, ...).

    Example: dprdm encoders info --encoder demo --json
    """
    def compute() -> dict[str, Any]:
        _offline()
        from dprdm.encoders import load_encoder

        return load_encoder(encoder).describe()

    run_command(as_json, "encoder", compute)


@app.command()
def embed(
    out: Path = typer.Option(..., "--out", help="Where to write the N x dim float32 .npy."),
    images: Path | None = typer.Option(None, "--images",
                                       help="A folder of images with captions.jsonl/.csv."),
    texts: Path | None = typer.Option(None, "--texts",
                                      help="Texts: .txt (one per line) or .jsonl ('caption')."),
    encoder: str = ENCODER_OPTION,
    size: int | None = typer.Option(None, "--size", help="Load images at this side (default: "
                                    "what the encoder wants: 64 demo, the crop size for CLIP)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    ids_out: Path | None = typer.Option(None, "--ids-out", help="Where to write the ids "
                                        "(JSON list; default OUT with .ids.json)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Embed a captioned image folder (--images) or a texts file (--texts) into a .npy.

    The .npy and its ids feed `dprdm index build EMB --ids IDS`.
    Example: dprdm encoders embed --images data/openmoji_private --out private.npy
    """
    def compute() -> dict[str, Any]:
        _offline()
        from dprdm.data import load_folder
        from dprdm.encoders import load_encoder

        if (images is None) == (texts is None):
            raise InvalidParameterError("give exactly one of --images or --texts")
        if out.suffix.lower() != ".npy":
            raise InvalidParameterError(f"--out must end in .npy, got {out}")
        model = load_encoder(encoder)
        if images is not None:
            data = load_folder(images, size or model.load_size)
            emb, ids = model.encode_images(data.images, batch_size), list(data.ids)
        else:
            items, ids = _read_texts(texts)
            emb = model.encode_text(items, batch_size)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, emb)
        ids_path = ids_out or out.with_suffix(".ids.json")
        ids_path.write_text(json.dumps(ids) + "\n", encoding="utf-8")
        return {"embeddings": str(out), "ids": str(ids_path), "rows": int(emb.shape[0]),
                "dim": int(emb.shape[1]), "encoder": model.describe()["encoder"]}

    run_command(as_json, "embeddings written", compute)


@app.command("train-demo")
def train_demo(
    data: Path = typer.Option(..., "--data", help="Demo data root (holds data/twemoji, "
                              "data/google and holdout/)."),
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to write."),
    dim: int = typer.Option(64, "--dim", min=1, help="Shared embedding dimension."),
    steps: int = typer.Option(1000, "--steps", min=1),
    image_size: int = typer.Option(32, "--image-size", help="Model input side (32 or 64)."),
    batch_size: int = typer.Option(256, "--batch-size", min=2),
    style_weight: float = typer.Option(1.0, "--style-weight", min=0.0),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads."),
    resume: bool = typer.Option(True, "--resume/--no-resume",
                                help="Continue from OUT/training_state.pt when present."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Train the demo encoder on the PUBLIC emoji styles (+ generic style augmentations).

    Example: dprdm encoders train-demo --data .dprdm-demo --out src/dprdm/weights/demo-encoder
    """
    def compute() -> dict[str, Any]:
        _offline()
        from dprdm.encoders.train_demo import TrainConfig
        from dprdm.encoders.train_demo import train_demo as run

        config = TrainConfig(dim=dim, steps=steps, image_size=image_size, batch_size=batch_size,
                             style_weight=style_weight, seed=seed, threads=threads)
        summary = run(data, out, config, show_progress=not as_json, resume=resume)
        stats = summary.pop("final_train_stats")
        summary.pop("settings")
        summary["sources"] = ", ".join(summary["sources"])
        return {**summary, **{f"train_{k}": v for k, v in stats.items()}}

    run_command(as_json, "demo encoder trained", compute)


@app.command()
def evaluate(
    data: Path = typer.Option(..., "--data", help="Demo data root (.dprdm-demo)."),
    encoder: str = ENCODER_OPTION,
    report: Path | None = typer.Option(None, "--report", help="Also write the full JSON here."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Content retrieval and style retention of an encoder on the emoji demo domains.

    Example: dprdm encoders evaluate --data .dprdm-demo --encoder demo
    """
    def compute() -> dict[str, Any]:
        _offline()
        from dprdm.encoders import load_encoder
        from dprdm.encoders.evaluate import evaluate_encoder, flatten, write_report

        result = evaluate_encoder(load_encoder(encoder), data, progress=not as_json)
        if report is not None:
            write_report(result, report)
        return flatten(result)

    run_command(as_json, "encoder evaluation", compute)
