"""`dprdm eval`: public-only vs DP-RDM vs non-private generation, scored on held-out images."""

from __future__ import annotations

from pathlib import Path

import typer

from dprdm import demo_layout
from dprdm.cli.generator_options import (GENERATOR_CHOICE, check_content_guidance,
                                      generator_options)
from dprdm.cli.output import (JSON_OPTION, LEDGER_OPTION, RAY_PRIVATE_NETWORK, cli_errors,
                              console, emit, err_console, progress_callback, run_command)
from dprdm.errors import InvalidParameterError, NotFoundError

QUICK_SAMPLES, QUICK_STEPS, QUICK_KID_SUBSETS = 24, 20, 20


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InvalidParameterError(f"{what} must be comma-separated numbers, got {text!r}")
    if not values:
        raise InvalidParameterError(f"{what} is empty")
    return values


def _ints(text: str, what: str) -> tuple[int, ...]:
    values = _floats(text, what)
    if any(v != int(v) for v in values):
        raise InvalidParameterError(f"{what} must be whole numbers, got {text!r}")
    return tuple(int(v) for v in values)


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def output_size(backend) -> int:
    """The side of the images `backend` renders (the held-out set is loaded at it)."""
    height = getattr(backend, "height", None)
    if height:
        return int(height)
    pipeline = backend.pipeline
    if hasattr(pipeline, "image_size"):  # the demo pipeline
        return int(pipeline.image_size)
    return int(pipeline.unet.config.sample_size * pipeline.vae_scale_factor)


@generator_options
def evaluate(
    index: Path = typer.Option(None, "--index", help="Private index directory."),
    holdout: Path = typer.Option(None, "--holdout",
                                 help="Held-out private images with a captions file "
                                      "(the prompts and the metrics' reference set)."),
    out: Path = typer.Option(..., "--out", help="Report directory (created)."),
    public_index: Path = typer.Option(None, "--public-index",
                                      help="PUBLIC index for the public-only setting."),
    epsilons: str = typer.Option("1,5,10", "--epsilons", help="Comma-separated epsilons."),
    queries: str = typer.Option("100,1000", "--queries",
                                help="Comma-separated query counts T (sigma is calibrated so "
                                     "that T queries reach each epsilon)."),
    k: int = typer.Option(None, "--k", help="Neighbours (default: the ledger's pinned k)."),
    q: float = typer.Option(None, "--q", help="Sampling rate (default: the ledger's pinned q)."),
    lam: float = typer.Option(None, "--lam", help="Mix weight (default: the ledger's lam)."),
    public_lam: float = typer.Option(
        None, "--public-lam", help="Public-only's mix of public neighbours (default: the "
                                   "generator's own (the shipped one: 0.25), else --lam)."),
    non_private_k: int = typer.Option(
        None, "--non-private-k", help="The non-private reference row's own k (default: with "
                                       "--demo the demo's 600, chosen on the validation "
                                       "domains; else --k)."),
    non_private_lam: float = typer.Option(
        None, "--non-private-lam", help="The non-private reference row's own lam (default: "
                                        "--lam)."),
    delta: float = typer.Option(None, "--delta",
                                help="delta (default: the index ledger's delta, else 1e-5)."),
    samples: int = typer.Option(None, "--samples", help="Prompts to use (default: all)."),
    guidance: float = typer.Option(3.0, "--guidance"),
    content_guidance: float = typer.Option(
        None, "--content-guidance", help="Demo generator: split guidance, this scale towards "
        "the prompt and --guidance from it towards the retrieved condition (default: "
        "the generator's own (the shipped one: 6), else plain guidance)."),
    steps: int = typer.Option(50, "--steps", help="Diffusion sampler steps."),
    pool: bool = typer.Option(True, "--pool/--no-pool",
                              help="Shrink each call's DP releases towards their mean, or the "
                                   "style estimate (James-Stein; free post-processing)."),
    prompt_batch: int = typer.Option(
        32, "--prompt-batch", help="Prompts per DP call, 1 to 32 (1: one request at a time, as "
                                   "the service gets them)."),
    style_estimate: bool = typer.Option(
        False, "--style-estimate",
        help="Each experiment ledger first spends one query per operator prompt (--style-prompts"
             ", or the demo's 64) on a style estimate, and every release is shrunk towards it "
             "(docs/privacy.md)."),
    style_prompts: Path = typer.Option(None, "--style-prompts",
                                       help="With --style-estimate: the operator prompts file "
                                            "(as `synthesize` reads them)."),
    seed: int = typer.Option(0, "--seed", help="Diffusion sampler and prompt-subset seed only."),
    repeats: int = typer.Option(1, "--repeats",
                                help="Images per prompt and setting, each with other diffusion "
                                     "seeds; all are scored (tighter comparisons, R x longer)."),
    classifiers_dir: Path = typer.Option(None, "--classifiers",
                                         help="Emoji demo classifiers (concept, style): used on the demo data, or on other data when given here (default: shipped)."),
    inception: Path = typer.Option(None, "--inception",
                                   help="Local FID InceptionV3 weights file: FID/KID/PRDC in "
                                        "Inception space instead of the public classifier's."),
    quick: bool = typer.Option(False, "--quick",
                               help=f"{QUICK_SAMPLES} prompts, eps 10, 1000 queries, "
                                    f"{QUICK_STEPS} steps: a smoke test in minutes."),
    demo: bool = typer.Option(False, "--demo", help="Use what `make demo` prepared."),
    validation: bool = typer.Option(
        False, "--validation",
        help="With --demo: a validation domain instead of OpenMoji (a public style held out: its "
             "index, held-out set and a public index without it, built when missing or when the "
             "encoder changed), scored with that style's judge."),
    validation_domain: str = typer.Option(
        None, "--validation-domain",
        help="With --validation: which held-out style (fluent_hc, the default: Fluent High "
             "Contrast line art; emojione: EmojiOne 2, the first domain, which its judge barely "
             "tells from the public styles)."),
    ledger_url: str = LEDGER_OPTION,
    ray_address: str = typer.Option(
        None, "--ray-address",
        help="A sharded --index only: run its shards as Ray actors for the DP and non-private "
             "runs ('local': an in-process Ray; 'auto' / host:port: the actors `dprdm index "
             "serve-shards` started). Without it a sharded index runs in this process. "
             + RAY_PRIVATE_NETWORK),
    synthetic: Path = typer.Option(None, "--synthetic",
                                   help="Score a `dprdm synthesize` job folder against --holdout "
                                        "(generates and charges nothing)."),
    choice=GENERATOR_CHOICE,
    as_json: bool = JSON_OPTION,
) -> None:
    """Reproduce the paper's comparison on your data: FID/KID/PRDC, concept, style, alignment.

    Any --generator (docs/backends.md): its own image tower embeds the prompts' queries and is the
    default feature space; an index from another tower is refused before anything is charged.

    Example: dprdm eval --demo --out eval-report/ --epsilons 1,5,10 --queries 100,1000

    Choosing recipes: dprdm eval --demo --validation --out val-report/ (Fluent High Contrast as
    the private domain, docs/evaluation.md "Validation domain").
    """

    if synthetic is not None:
        from dprdm.synthesis.scoring import score_synthetic_cli

        run_command(as_json, "synthetic data set", lambda: score_synthetic_cli(
            synthetic, holdout, demo, out, choice.encoder or "demo",
            Path(choice.model) if choice.model else None, classifiers_dir, inception, seed))
        return

    def compute() -> dict:
        from dprdm.data import load_folder
        from dprdm.evaluation.classifiers import DEFAULT_DIR as CLASSIFIERS_DIR
        from dprdm.evaluation.classifiers import EvalClassifiers
        from dprdm.evaluation.harness import EvalPlan, HeldOut, run_evaluation
        from dprdm.evaluation.metrics import inception_extractor
        from dprdm.evaluation.report import PRIVATE_REPORT_WARNING, write_report
        from dprdm.privacy import open_private_index
        from dprdm.privacy.binding import binding_of
        from dprdm.privacy.ledger import LEDGER_FILENAME
        from dprdm.rdm import MechanismSettings
        from dprdm.retrieval import EmbeddingIndex
        from dprdm.retrieval.shards import ShardedIndex, open_index
        from dprdm.style_estimate import read_operator_prompts

        split = check_content_guidance(content_guidance, choice.generator)  # before any work
        index_dir, holdout_dir, public_dir = index, holdout, public_index
        backend, domain, judge_dir = None, None, None
        if validation_domain is not None and not validation:
            raise InvalidParameterError("--validation-domain goes with --validation")
        if validation:
            if not demo:
                raise InvalidParameterError("--validation is the demo's validation domain: "
                                            "give --demo with it")
            if index or holdout or public_index:
                raise InvalidParameterError("--validation picks its own indexes and held-out "
                                            "set: leave out --index, --holdout, --public-index")
            from dprdm.validation import domain_named, prepare_validation

            domain_named(validation_domain)  # an unknown name is refused before anything is built
            backend = choice.load_backend()
            built = prepare_validation(
                backend, say=lambda line: err_console.print(f"[dim]{line}[/]"),
                domain=validation_domain)
            index_dir, holdout_dir = Path(built["private"]), Path(built["holdout"])
            public_dir, judge_dir = Path(built["public"]), Path(built["judge"])
            domain = (f"Validation domain ({built['domain']}): {built['title']} held out as the "
                      f"private style ({built['n_private']} images in the private index, "
                      f"{built['n_holdout']} held-out images of the OpenMoji held-out concepts "
                      f"as prompts and reference; public index: {built['n_public']} "
                      f"{built['public_titles']} images). Not OpenMoji: choose recipes here, "
                      f"report on OpenMoji.")
        if demo:
            index_dir = index_dir or demo_layout.require(demo_layout.private_index_dir())
            holdout_dir = holdout_dir or demo_layout.require(demo_layout.holdout_dir())
            public_dir = public_dir or demo_layout.public_index_dir()
            if not public_dir.exists():
                public_dir = None
        if index_dir is None or holdout_dir is None:
            raise InvalidParameterError("give --index and --holdout (or --demo)")
        demo_non_private_k = None
        if demo:  # the demo's non-private reference row: its own k (chosen on validation)
            from dprdm.demo import DEMO_NON_PRIVATE_K

            demo_non_private_k = DEMO_NON_PRIVATE_K
        operator_prompts: tuple[str, ...] = ()
        if style_prompts is not None and not style_estimate:
            raise InvalidParameterError("--style-prompts goes with --style-estimate")
        if style_estimate:
            if style_prompts is not None:
                operator_prompts = tuple(read_operator_prompts(style_prompts))
            elif demo:
                from dprdm.demo import style_estimate_prompts

                operator_prompts = tuple(style_estimate_prompts())
            else:
                raise InvalidParameterError("--style-estimate needs --style-prompts FILE (or "
                                            "--demo)")
        if out.exists() and not out.is_dir():
            raise InvalidParameterError(f"{out} exists and is not a directory")
        saved, ledger_delta = None, None
        private = open_index(index_dir)  # a clear error for a missing or broken index
        sharded = isinstance(private, ShardedIndex)
        if ray_address is not None and not sharded:
            raise InvalidParameterError("--ray-address needs a sharded index (dprdm index shard)")
        if (binding_of(index_dir) is not None or (Path(index_dir) / LEDGER_FILENAME).exists()
                or ledger_url is not None):
            # The production ledger, verified, read only: never charged (experiments use
            # in-memory ledgers).
            _, production = open_private_index(index_dir, ledger_url, read_only=True)
            saved = MechanismSettings.from_ledger(production)
            ledger_delta = production.delta
        if saved is None and None in (k, q):
            raise InvalidParameterError(f"{index_dir} has no ledger with a pinned mechanism: "
                                        "give --k and --q")
        plan = EvalPlan(
            epsilons=(10.0,) if quick else _floats(epsilons, "--epsilons"),
            queries=(1000,) if quick else _ints(queries, "--queries"),
            k=k if k is not None else saved.k, q=q if q is not None else saved.q,
            lam=lam if lam is not None else (saved.lam if saved else 1.0),
            delta=delta if delta is not None else (ledger_delta or 1e-5),
            samples=QUICK_SAMPLES if quick and samples is None else samples,
            guidance=guidance, steps=QUICK_STEPS if quick else steps, seed=seed,
            content_guidance=split.get("content_guidance"), pool=pool,
            prompt_batch=prompt_batch, style_prompts=operator_prompts, public_lam=public_lam,
            non_private_k=non_private_k if non_private_k is not None else demo_non_private_k,
            non_private_lam=non_private_lam,
            repeats=repeats, kid_subsets=QUICK_KID_SUBSETS if quick else 100)
        backend = backend or choice.load_backend()
        public = EmbeddingIndex.open(public_dir) if public_dir is not None else None
        for opened, what in ((private, "private"), (public, "public")):
            if opened is not None:  # refused before any experiment ledger is charged
                backend.space.check_index(opened.path, opened.dim, what,
                                          require_record=backend.name != "demo")
        held = load_folder(holdout_dir, output_size(backend), show_progress=False)
        shards = None
        if sharded:  # the shards (here, or Ray actors that check their files) start once
            from dprdm.privacy.sharded import shard_backend

            shards = shard_backend(private, ray_address)
        # The demo's classifiers know emoji only: their scores are shown on the demo data alone.
        on_demo_data = demo or _same_dir(index_dir, demo_layout.private_index_dir())
        classifiers = (EvalClassifiers.from_pretrained(classifiers_dir or CLASSIFIERS_DIR)
                       if on_demo_data or classifiers_dir is not None else None)
        if validation:  # the concept network stays; the style columns are the judge's
            from dprdm.evaluation.judge import JudgedClassifiers, StyleJudge

            classifiers = JudgedClassifiers(classifiers, StyleJudge.from_pretrained(judge_dir))
        demo_parts = backend.name == "demo"  # the demo keeps its encoder (alignment, features)
        result = run_evaluation(
            plan, HeldOut(held.images, list(held.captions)),
            backend.encoder if demo_parts else None, backend.pipeline if demo_parts else backend,
            private, public, classifiers,
            extractor=inception_extractor(inception) if inception is not None else None,
            progress_for=lambda label: progress_callback(f"generating: {label}",
                                                         enabled=not as_json),
            private_shards=shards, domain=domain)
        files = write_report(result, out)
        return {"runs": result.runs, "reference": result.notes["reference"], "files": files,
                "feature_space": result.notes["feature_space"],
                "demo_metrics": result.notes["demo_metrics"],
                "style_target": result.notes["style_target"], "domain": domain,
                "experiment_ledger": "in-memory; the index's own ledger was not charged",
                "warning": result.notes["warning"],
                "report_warning": PRIVATE_REPORT_WARNING}

    with cli_errors(as_json):
        result = compute()
    if as_json:
        emit(result, as_json=True)
        return
    from rich.table import Table

    from dprdm.evaluation.report import cell, present_columns, retarget_columns

    columns = present_columns(result["runs"], retarget_columns([
        ("label", "setting"), ("sigma", "sigma"), ("fid", "FID"), ("kid", "KID x1e3"),
        ("kid_vs_public_only", "KID - public-only (paired)"), ("concept_top10", "top-10"),
        ("openmoji_like", "OpenMoji-like"), ("openmoji_like_strict", "OpenMoji-like (strict)"),
        ("alignment", "align.")], result["style_target"]))
    table = Table(title="dprdm eval (lower FID/KID is better; all columns in results.md)")
    for _, title in columns:
        table.add_column(title, justify="right")
    for row in result["runs"]:
        table.add_row(*(cell(key, row) for key, _ in columns))
    console.print(table)
    for name, path in result["files"].items():
        console.print(f"{name}: {path}")
    if result["domain"]:
        console.print(f"[bold]{result['domain']}[/]")
    console.print(f"FID/KID/PRDC in the feature space of {result['feature_space']}.")
    console.print(f"[yellow]{result['warning']}[/]")
    console.print(f"[bold yellow]{result['report_warning']}[/]")
