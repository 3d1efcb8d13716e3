"""`dprdm generate`: prompts -> images, through DP retrieval from a private index."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dprdm import demo_layout
from dprdm.cli.generator_options import (GENERATOR_CHOICE, check_content_guidance,
                                      generator_options)
from dprdm.cli.output import (JSON_OPTION, LEDGER_OPTION, RAY_PRIVATE_NETWORK, console,
                              run_command)
from dprdm.conditioning import check_lam
from dprdm.errors import InvalidParameterError
from dprdm.files import write_bytes_atomically
from dprdm.image_files import image_grid, save_png


@generator_options
def generate(
    prompts: list[str] = typer.Argument(..., help="One or more text prompts."),
    index: Path = typer.Option(None, "--index", help="Private index directory (with a ledger)."),
    lam: float = typer.Option(None, "--lam", help="c = lam * released + (1 - lam) * text "
                                                  "(default: the ledger's lam; free). With "
                                                  "--public-only: the public neighbours' mix "
                                                  "(default: the generator's own, else the "
                                                  "ledger's)."),
    n: int = typer.Option(1, "-n", "--images-per-prompt", help="Images per prompt (free)."),
    pool: bool = typer.Option(True, "--pool/--no-pool",
                              help="Shrink the prompts' DP releases towards the index's "
                                   "style estimate, else their mean (James-Stein, "
                                   "docs/privacy.md; free)."),
    guidance: float = typer.Option(3.0, "--guidance", help="Classifier-free guidance scale."),
    content_guidance: float = typer.Option(
        None, "--content-guidance", help="Demo generator: split guidance, this scale towards "
        "the prompt and --guidance from it towards the retrieved condition (docs/generator.md; "
        "default: the generator's own "
        "(the shipped one: 6), else plain guidance)."),
    steps: int = typer.Option(50, "--steps", help="Diffusion sampling steps."),
    seed: int = typer.Option(None, "--seed", help="Seed for the DIFFUSION sampler only."),
    out: Path = typer.Option(..., "--out", help="Output directory (created)."),
    public_only: bool = typer.Option(False, "--public-only",
                                     help="Use no private data: public index or text only."),
    public_index: Path = typer.Option(None, "--public-index", help="A PUBLIC index (optional)."),
    demo: bool = typer.Option(False, "--demo", help="Use what `make demo` prepared."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace an earlier run's images in --out."),
    ray_address: str = typer.Option(
        None, "--ray-address",
        help="A sharded --index only: its shards as Ray actors ('local', or 'auto' / host:port "
             "for those `dprdm index serve-shards` started). " + RAY_PRIVATE_NETWORK),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Print what the call would charge (epsilon before/after, "
                                      "queries left); charge, generate and write nothing."),
    ledger_url: str = LEDGER_OPTION,
    choice=GENERATOR_CHOICE,
    as_json: bool = JSON_OPTION,
) -> None:
    """Generate images; each prompt costs one private query (all its images are free).

    The mechanism (k, q, sigma) is the one pinned in the index's ledger (`dprdm budget init`).
    --generator picks the model (docs/backends.md); an index embedded with another image tower
    than the generator's is refused before anything is charged.

    Example: dprdm generate "red apple" "cat face" --demo -n 4 --out out/

    Example: dprdm generate "a red apple" --index private-index/ --generator kandinsky-2.2
    --model kandinsky-2-2-decoder/ --prior kandinsky-2-2-prior/ --steps 25 --out out/
    """

    def compute() -> dict:
        from dprdm.privacy import open_private_index
        from dprdm.rdm import (MechanismSettings, RetrievalAugmentedGenerator, check_prompts,
                               check_sampling)
        from dprdm.retrieval import EmbeddingIndex
        from dprdm.style_estimate import load_style_estimate

        # Validate everything before any private query is charged.
        prompt_list = check_prompts(prompts)
        check_sampling(n, guidance, steps)
        split = check_content_guidance(content_guidance, choice.generator)
        index_dir, public_dir = index, public_index
        if demo:
            index_dir = index_dir or demo_layout.require(demo_layout.private_index_dir())
            public_dir = public_dir or demo_layout.public_index_dir()
            if not public_dir.exists():
                public_dir = None
        if out.exists() and not out.is_dir():
            raise InvalidParameterError(f"{out} exists and is not a directory")
        earlier_run = sorted(out.glob("prompt*_image*.png")) if out.is_dir() else []
        if (earlier_run or (out / "report.json").exists()) and not overwrite:
            raise InvalidParameterError(
                f"{out} holds an earlier run's images; choose another --out, or pass --overwrite "
                "to replace them")
        if index_dir is None and not public_only:
            raise InvalidParameterError("give --index DIR (or --demo), or use --public-only")
        if lam is not None:
            check_lam(lam)
        private, ledger, settings, estimate = None, None, None, None
        if index_dir is not None:  # verified pair; public-only still reads the pinned k and lam
            opened, ledger = open_private_index(index_dir, ledger_url)
            settings = MechanismSettings.from_ledger(ledger, lam)
            private = None if public_only else opened
            ledger = None if public_only else ledger
            if private is not None and pool:  # the operator's, when made (or a clear refusal)
                estimate = load_style_estimate(index_dir, ledger.ledger_id, private.dim)
        if dry_run:
            from dprdm.privacy.receipts import preview

            if ledger is None:
                return {"dry_run": True, "queries": 0, "mode": "public-only",
                        "note": "public-only generation charges no privacy budget"}
            return dict(preview(ledger, len(prompt_list)), prompts=prompt_list)
        public = EmbeddingIndex.open(public_dir) if public_dir else None
        # the backend's space is checked against both indexes here, before anything is charged
        rag = RetrievalAugmentedGenerator(
            backend=choice.load_backend(**split),
            private_index=private, ledger=ledger, settings=settings,
            public_index=public,
            ray_address=ray_address, pool=pool, style_estimate=estimate,
            public_lam=lam if public_only else None,
        )
        out.mkdir(parents=True, exist_ok=True)
        result = rag.generate(prompt_list, n=n, guidance=guidance, steps=steps, seed=seed,
                              public_only=public_only, caller="cli:generate")
        for stale in earlier_run:  # only with --overwrite: no image of the old run is kept
            stale.unlink(missing_ok=True)
        files = []
        for p, per_prompt in enumerate(result.images):
            for i, image in enumerate(per_prompt):
                path = out / f"prompt{p:03d}_image{i:02d}.png"
                save_png(path, image)
                files.append(str(path))
        save_png(out / "grid.png", image_grid(result.images, row_labels=prompt_list))
        report = dict(result.report, files=files, grid=str(out / "grid.png"))
        write_bytes_atomically(out / "report.json", (json.dumps(report, indent=1) + "\n").encode())
        if not as_json:
            console.print(f"wrote {len(files)} images and {out / 'grid.png'}")
        return report

    run_command(as_json, "generation", compute)
