"""`dprdm encoders ...`: describe an encoder, embed data with it, train/evaluate the demo one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

from dprdm.cli.generator_options import GENERATOR_CHOICE, generator_options
from dprdm.cli.output import JSON_OPTION, progress_callback, run_command
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


def _skip_rows(by_kind: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Skip counts as table rows: {"skipped: corrupt": "2 (a.png, b.png)"}."""
    rows = {}
    for kind, entry in by_kind.items():
        more = ", ..." if entry["count"] > len(entry["examples"]) else ""
        rows[f"skipped: {kind}"] = f"{entry['count']} ({', '.join(entry['examples'])}{more})"
    return rows


@app.command()
@generator_options(exclude=("batch_size", "attention_slicing", "cpu_offload", "image_size"))
def embed(
    out: Path = typer.Option(..., "--out", help="Where to write the N x dim float32 .npy."),
    images: Path | None = typer.Option(
        None, "--images", help="A folder of images, searched recursively (PNG, JPEG, WebP, GIF, "
        "BMP, TIFF); no captions needed."),
    texts: Path | None = typer.Option(None, "--texts",
                                      help="Texts: .txt (one per line) or .jsonl ('caption')."),
    size: int | None = typer.Option(None, "--size", help="Load images at this side (default: "
                                    "the encoder's load_size in `dprdm encoders info`: 64 for "
                                    "the demo, which its 32 px tower downsamples; the crop size "
                                    "for CLIP)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Images per tower call."),
    shard: str | None = typer.Option(
        None, "--shard", metavar="I/N", help="Embed only the I-th of N contiguous parts of the "
        "folder's sorted file list (0 <= I < N); give every shard's OUT to `index build`."),
    ids_out: Path | None = typer.Option(None, "--ids-out", help="Where to write the ids "
                                        "(JSON list; default OUT with .ids.json)."),
    public: bool = typer.Option(
        False, "--public", help="Declare the input PUBLIC data: recorded in OUT's provenance "
        "file (OUT with .provenance.json), which `index quantize` needs before it trains on OUT. "
        "Never for private images."),
    choice=GENERATOR_CHOICE,
    as_json: bool = JSON_OPTION,
) -> None:
    """Embed a folder of images (--images) or a texts file (--texts) into a .npy.

    Images are embedded with the image tower of --generator (default: the demo encoder, or the
    CLIP folder --encoder): kandinsky-2.2 -> the --prior folder's image_encoder; stable-unclip and
    ip-adapter -> the --encoder CLIP folder (the other generator flags are accepted and only the
    tower is loaded). On the GPU when --device allows. Progress is journaled in OUT.partial/: an
    interrupted run started again with the same arguments continues where it stopped.

    Writes OUT, its ids (file paths relative to the folder, or line numbers) and a provenance
    file saying where OUT came from, which image tower made it (its fingerprint; `index build`
    records it in the index) and whether it is public (--public). Unreadable, corrupt and
    unsupported files are named, skipped and counted per reason; nothing embeddable is an error
    (exit 2, nothing written). The .npy feeds `dprdm index build EMB [EMB ...]`.
    Example: dprdm encoders embed --images my-photos/ --out private.npy
    Example: dprdm encoders embed --generator kandinsky-2.2 --prior kandinsky-2-2-prior/
    --images photos/ --out private.npy --shard 0/4
    """
    def compute() -> dict[str, Any]:
        _offline()
        from dprdm.encoders.collection import embed_collection, parse_shard
        from dprdm.files import save_npy_atomically, write_bytes_atomically
        from dprdm.provenance import write_sidecar

        if (images is None) == (texts is None):
            raise InvalidParameterError("give exactly one of --images or --texts")
        if out.suffix.lower() != ".npy":
            raise InvalidParameterError(f"--out must end in .npy, got {out}")
        if images is not None and not images.is_dir():
            raise InvalidParameterError(f"--images must be a folder: {images}")
        if images is not None:
            part = parse_shard(shard)
            tower = choice.load_image_tower()
            with progress_callback(f"embedding {images.name}", enabled=not as_json) as progress:
                done = embed_collection(tower, images, out, batch_size=batch_size, shard=part,
                                        public=public, ids_out=ids_out, size=size,
                                        progress=progress)
            report = done.pop("report")
            skipped = report.by_kind(SKIP_EXAMPLES)
            result: dict[str, Any] = {
                **{k: done[k] for k in ("embeddings", "ids", "provenance")}, "public": public,
                "rows": done["rows"], "dim": done["dim"],
                "encoder": tower.describe().get("encoder"), "generator": choice.generator,
                "conditioning_space": tower.space.to_dict(), "source": str(images),
                "embedded": done["rows"], "skipped": report.n_skipped, "shard": done["shard"],
                "chunks_resumed": done["chunks_resumed"]}
        else:
            if shard is not None:
                raise InvalidParameterError("--shard is for --images")
            if choice.generator == "kandinsky-2.2":
                raise InvalidParameterError(
                    "kandinsky-2.2 maps prompts to image embeddings with its prior (`dprdm "
                    "generate` does it per prompt); --texts takes a CLIP or demo encoder")
            from dprdm.encoders import load_encoder

            model = load_encoder(choice.encoder or "demo")
            items, ids = _read_texts(texts)
            if not items:
                raise InvalidParameterError(f"nothing to embed: {texts} is empty; no file was "
                                            "written")
            emb = model.encode_text(items, batch_size)
            out.parent.mkdir(parents=True, exist_ok=True)
            ids_path = ids_out or out.with_suffix(".ids.json")
            save_npy_atomically(out, emb)
            write_bytes_atomically(ids_path, (json.dumps(ids) + "\n").encode())
            name = model.describe()["encoder"]
            sidecar = write_sidecar(out, public=public, source=str(Path(texts).resolve()),
                                    tool="dprdm encoders embed" + (" --public" if public else ""),
                                    rows=int(emb.shape[0]), dim=int(emb.shape[1]), encoder=name)
            skipped = {}
            result = {"embeddings": str(out), "ids": str(ids_path), "provenance": str(sidecar),
                      "public": public, "rows": int(emb.shape[0]), "dim": int(emb.shape[1]),
                      "encoder": name, "source": str(texts), "embedded": len(ids), "skipped": 0}
        if as_json:
            return {**result, "skipped_by_reason": skipped}
        result.pop("conditioning_space", None)
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
    public_splits: str = typer.Option(
        "data/twemoji,data/google", "--public-splits",
        help="Comma-separated PUBLIC style folders under --data to train on."),
    family_size: int = typer.Option(
        0, "--family-size", min=0,
        help="> 0: train on this many procedural public styles (dprdm.data.style_family) with a "
             "supervised contrastive style loss instead of the 7 augmentations and style head."),
    sources_per_batch: int = typer.Option(64, "--sources-per-batch", min=1,
                                          help="Family mode: styles per batch."),
    p_original: float = typer.Option(0.5, "--p-original", min=0.0, max=1.0,
                                     help="Share of batch items (family mode: of batch styles) "
                                          "drawn from the real styles as they are."),
    init_from: Path | None = typer.Option(
        None, "--init-from", help="Start from this demo encoder's weights (fine-tuning), e.g. "
        "src/dprdm/weights/demo-encoder."),
    warmup_steps: int = typer.Option(50, "--warmup-steps", min=0),
    lr: float = typer.Option(2e-3, "--lr", min=0.0),
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
                             style_weight=style_weight, seed=seed, threads=threads,
                             public_splits=tuple(p.strip() for p in public_splits.split(",")
                                                 if p.strip()),
                             family_size=family_size, sources_per_batch=sources_per_batch,
                             p_original=p_original, lr=lr, warmup_steps=warmup_steps,
                             init_from=str(init_from) if init_from else "")
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
