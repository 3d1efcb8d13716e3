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


SKIP_EXAMPLES = 5  # file names shown per skip reason


def _relative(path: str, folder: Path) -> str:
    try:
        return Path(path).relative_to(folder).as_posix()
    except ValueError:
        return path


def _skip_rows(by_kind: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Skip counts as table rows: {"skipped: corrupt": "2 (a.png, b.png)"}."""
    rows = {}
    for kind, entry in by_kind.items():
        more = ", ..." if entry["count"] > len(entry["examples"]) else ""
        rows[f"skipped: {kind}"] = f"{entry['count']} ({', '.join(entry['examples'])}{more})"
    return rows


@app.command()
def embed(
    out: Path = typer.Option(..., "--out", help="Where to write the N x dim float32 .npy."),
    images: Path | None = typer.Option(
        None, "--images", help="A folder of images, searched recursively (PNG, JPEG, WebP, GIF, "
        "BMP, TIFF); no captions needed."),
    texts: Path | None = typer.Option(None, "--texts",
                                      help="Texts: .txt (one per line) or .jsonl ('caption')."),
    encoder: str = ENCODER_OPTION,
    size: int | None = typer.Option(None, "--size", help="Load images at this side (default: "
                                    "the encoder's load_size in `dprdm encoders info`: 64 for "
                                    "the demo, which its 32 px tower downsamples; the crop size "
                                    "for CLIP)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    ids_out: Path | None = typer.Option(None, "--ids-out", help="Where to write the ids "
                                        "(JSON list; default OUT with .ids.json)."),
    public: bool = typer.Option(
        False, "--public", help="Declare the input PUBLIC data: recorded in OUT's provenance "
        "file (OUT with .provenance.json), which `index quantize` needs before it trains on OUT. "
        "Never for private images."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Embed a folder of images (--images) or a texts file (--texts) into a .npy.

    Writes OUT, its ids (file paths relative to the folder, or line numbers) and a provenance
    file saying where OUT came from and whether it is public (--public). Unreadable, corrupt and
    unsupported files are skipped and counted per reason; nothing embeddable is an error (exit 2,
    nothing written). The .npy and its ids feed `dprdm index build EMB --ids IDS`.
    Example: dprdm encoders embed --images my-photos/ --out private.npy
    """
    def compute() -> dict[str, Any]:
        _offline()
        from dprdm.data import LoadReport, iter_image_folder
        from dprdm.encoders import load_encoder
        from dprdm.files import save_npy_atomically, write_bytes_atomically
        from dprdm.provenance import write_sidecar

        if (images is None) == (texts is None):
            raise InvalidParameterError("give exactly one of --images or --texts")
        if out.suffix.lower() != ".npy":
            raise InvalidParameterError(f"--out must end in .npy, got {out}")
        if images is not None and not images.is_dir():
            raise InvalidParameterError(f"--images must be a folder: {images}")
        model = load_encoder(encoder)
        report = LoadReport()
        if images is not None:
            chunks, ids = [], []
            for batch_ids, pixels in iter_image_folder(images, size or model.load_size,
                                                       batch_size, report,
                                                       show_progress=not as_json):
                chunks.append(model.encode_images(pixels, batch_size))
                ids += batch_ids
            source = images
        else:
            items, ids = _read_texts(texts)
            chunks = [model.encode_text(items, batch_size)] if items else []
            report.n_loaded, source = len(items), texts
        skipped = report.by_kind(SKIP_EXAMPLES)
        if images is not None:  # name files as the ids do: relative to the folder
            for entry in skipped.values():
                entry["examples"] = [_relative(e, images) for e in entry["examples"]]
        if not ids:
            from dprdm.data import describe_skips
            from dprdm.data.loaders import FOLDER_IMAGE_EXTENSIONS

            what = (f"no decodable image under {images} (looked for "
                    f"{', '.join(FOLDER_IMAGE_EXTENSIONS)}, recursively); skipped: "
                    f"{describe_skips(report)}" if images is not None else f"{texts} is empty")
            raise InvalidParameterError(f"nothing to embed: {what}; no file was written")
        emb = np.concatenate(chunks)
        out.parent.mkdir(parents=True, exist_ok=True)
        ids_path = ids_out or out.with_suffix(".ids.json")
        save_npy_atomically(out, emb)
        write_bytes_atomically(ids_path, (json.dumps(ids) + "\n").encode())
        name = model.describe()["encoder"]
        sidecar = write_sidecar(out, public=public, source=str(Path(source).resolve()),
                                tool="dprdm encoders embed" + (" --public" if public else ""),
                                rows=int(emb.shape[0]), dim=int(emb.shape[1]), encoder=name)
        result: dict[str, Any] = {
            "embeddings": str(out), "ids": str(ids_path), "provenance": str(sidecar),
            "public": public, "rows": int(emb.shape[0]), "dim": int(emb.shape[1]),
            "encoder": name, "source": str(source), "embedded": len(ids),
            "skipped": report.n_skipped,
        }
        if as_json:
            return {**result, "skipped_by_reason": skipped}
        return {**result, **_skip_rows(skipped)}

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
