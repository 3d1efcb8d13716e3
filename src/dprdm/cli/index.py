"""`dprdm index ...`: build an embedding index, describe it, give it a public quantizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from dprdm.cli.output import JSON_OPTION, RAY_PRIVATE_NETWORK, progress_callback, run_command
from dprdm.errors import DprdmError, InvalidParameterError
from dprdm.privacy.ledger import LEDGER_FILENAME, SqliteLedger
from dprdm.privacy.noise import noise_grid, noise_scale, production_sampler
from dprdm.retrieval import store
from dprdm.retrieval.partition import IVFPartition
from dprdm.retrieval.search import PublicQuantizer, train_public_quantizer

app = typer.Typer(help="Build and inspect embedding indexes.", no_args_is_help=True)

# Below this many rows a build takes well under a second; no progress bar.
PROGRESS_MIN_ROWS = 200_000
# Below this size the embeddings are hashed in well under a second; no progress bar.
PROGRESS_MIN_BYTES = 256 * 1024 * 1024


def _read_ids(path: Path) -> list[str | int]:
    """Ids from a JSON list (.json) or one id per line (.txt, kept as strings)."""
    if not path.is_file():
        raise InvalidParameterError(f"no ids file at {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            ids = json.loads(text)
        except ValueError as error:
            raise InvalidParameterError(f"{path} is not valid JSON") from error
        if not isinstance(ids, list):
            raise InvalidParameterError(f"{path} must hold a JSON list of ids")
        return ids
    if path.suffix.lower() == ".txt":
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        empty = [row for row, line in enumerate(lines) if not line.strip()]
        if empty:
            raise InvalidParameterError(f"{path}: empty id on {store.describe_rows(empty)}")
        return [line.strip() for line in lines]
    raise InvalidParameterError(f"{path}: ids must be a .json or .txt file")


def _embedding_inputs(files: list[Path], ids: Path | None
                      ) -> tuple[Any, list[str | int] | None, dict[str, bytes], dict | None]:
    """(matrix, ids, extra index files, space) from one or more `encoders embed` outputs.

    Each EMB's provenance file (when it matches the file) names the image tower it was embedded
    with; the index records it (``conditioning_space.json``) so that generators refuse it when
    their tower differs. Several EMB files (the shards of one folder) are concatenated in the
    order given and must come from the same tower; their ids come from each EMB's ``.ids.json``.
    """
    import numpy as np

    from dprdm.generation.backends.base import SPACE_FILE
    from dprdm.provenance import read_sidecar

    if ids is not None and len(files) > 1:
        raise InvalidParameterError("--ids goes with one EMB file; several EMB files take their "
                                    "ids from the .ids.json `encoders embed` wrote beside each")
    spaces = []
    for path in files:
        record, _ = read_sidecar(path) if path.is_file() else (None, "")
        spaces.append((record or {}).get("conditioning_space"))
    if len({json.dumps(space, sort_keys=True) for space in spaces}) > 1:
        raise InvalidParameterError(
            "the EMB files were embedded with different image towers (or some record none): "
            "embed every part with the same --generator flags")
    matrices = [store.load_embeddings(path) for path in files]
    matrix = matrices[0] if len(matrices) == 1 else np.concatenate(matrices)
    if ids is not None:
        id_list = _read_ids(ids)
    else:  # the ids `encoders embed` wrote, when every EMB has them
        beside = [path.with_suffix(".ids.json") for path in files]
        id_list = None
        if all(path.is_file() for path in beside):
            id_list = [i for path in beside for i in _read_ids(path)]
    space = spaces[0]
    extra = {}
    if space is not None:
        extra[SPACE_FILE] = (json.dumps(space, indent=1) + "\n").encode()
    return matrix, id_list, extra, space


@app.command()
def build(
    embeddings: list[Path] = typer.Argument(
        ..., metavar="EMB...", help="N x d embeddings (.npy, or .npz with one array); several "
        "files (the --shard outputs of `encoders embed`) are concatenated in the order given."
    ),
    out: Path = typer.Option(..., "--out", help="Index directory to create."),
    ids: Path | None = typer.Option(None, "--ids", help="Record ids: a JSON list or one per line "
                                    "(default: EMB's .ids.json from `encoders embed`, if any)."),
    dtype: str = typer.Option("float32", "--dtype", help="Storage dtype: float32 or float16."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing index (never one holding a ledger)."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """L2-normalise the embeddings in EMB and write them atomically as an index at --out.

    The output of `dprdm encoders embed` goes in directly: its ids and the image tower it was
    embedded with (recorded in the index; generators refuse an index from another tower).

    Example: dprdm index build private_emb.npy --out private_index --ids ids.json --dtype float16
    Example: dprdm index build part0.npy part1.npy part2.npy part3.npy --out private_index
    """

    def compute() -> dict[str, Any]:
        matrix, id_list, extra, space = _embedding_inputs(list(embeddings), ids)
        with progress_callback(
            "normalising rows", enabled=not as_json and matrix.shape[0] >= PROGRESS_MIN_ROWS
        ) as progress:
            index = store.build_index(
                matrix, out, ids=id_list, dtype=dtype, overwrite=overwrite, progress=progress,
                extra_files=extra,
            )
        return {**index.info(), "conditioning_space": space,
                "noise": _saved_mechanism_noise(out, index.dim)}

    run_command(as_json, "index built", compute)


@app.command()
def info(
    directory: Path = typer.Argument(..., metavar="DIR", help="Index directory."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Describe the index at DIR (size, dtype, ledger, quantizer; the shards of a sharded one;
    the image tower its rows were embedded with (conditioning_space; null when not recorded);
    and the noise of the mechanism pinned in its ledger: sampler and grid; null without one).

    Example: dprdm index info private_index --json
    """
    from dprdm.retrieval.shards import open_index

    def compute() -> dict[str, Any]:
        from dprdm.generation.backends.base import ConditioningSpace

        index = open_index(directory)
        space = ConditioningSpace.load(directory)
        return {**index.info(), "conditioning_space": space.to_dict() if space else None,
                "noise": _saved_mechanism_noise(directory, index.dim)}

    run_command(as_json, "embedding index", compute)


def _saved_mechanism_noise(directory: Path, dim: int) -> dict[str, Any] | None:
    """{"sampler", "grid"} of the mechanism pinned in the index's ledger, as the CLI and the
    service release it; None when the index has no ledger yet."""
    if not (Path(directory) / LEDGER_FILENAME).is_file():
        return None
    try:
        params = SqliteLedger(directory).mechanism
    except DprdmError:  # not a readable ledger: `budget show` / `retrieve` say why
        return None
    grid = noise_grid(params.sigma, params.k, dim)
    return {"sampler": production_sampler(noise_scale(params.sigma, grid)), "grid": grid}


@app.command()
def verify(
    directory: Path = typer.Argument(..., metavar="DIR", help="Index directory."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Recompute the full SHA-256 of the embeddings (every shard's, for a sharded index) and
    compare it with the one recorded at `budget init` (opening an index only checks size, sampled
    blocks and, when the modification time changed, the full hash). Exit 2 when the embeddings
    changed.

    Example: dprdm index verify private_index --json
    """
    from dprdm.privacy.binding import embeddings_bytes, verify_index

    def compute() -> dict[str, Any]:
        size = embeddings_bytes(directory)
        with progress_callback("hashing embeddings",
                               enabled=not as_json and size >= PROGRESS_MIN_BYTES) as progress:
            return verify_index(directory, progress)

    run_command(as_json, "index verified", compute)


@app.command()
def quantize(
    directory: Path = typer.Argument(
        ..., metavar="DIR", help="Index directory to add the quantizer to."
    ),
    public: Path = typer.Option(..., "--public", help="PUBLIC vectors to train k-means on (.npy)."),
    nlist: int = typer.Option(..., "--nlist", help="Number of inverted lists (k-means centroids)."),
    seed: int = typer.Option(1234, "--seed", help="k-means seed (public data: no privacy cost)."),
    data_is_public: bool = typer.Option(
        False, "--data-is-public", help="Acknowledge that the --public file holds only PUBLIC "
        "data. Needed when no provenance file from `dprdm encoders embed --public` marks it so."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace the index's existing quantizer."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Train a coarse quantizer on PUBLIC vectors and save it into the index for IVF search,
    with the partition of the index's records into its lists (computed once, reused by every
    `dprdm retrieve --strategy ivf-subsample/ivf`).

    The --public file must be marked public: by the provenance file `dprdm encoders embed
    --public` writes beside it, or by --data-is-public. Refuses public vectors that equal records
    of the index, or of which more than 1 % nearly duplicate them (cosine > 0.999): a quantizer
    trained on private data would void the privacy argument. The index records the file the
    quantizer was trained on (name, SHA-256, rows, who declared it public).

    Example: dprdm index quantize private_index --public public_emb.npy --nlist 1024
    """

    def compute() -> dict[str, Any]:
        from dataclasses import replace

        from dprdm.provenance import require_public_file

        index = store.EmbeddingIndex.open(directory)
        existing = (store.QUANTIZER_MANIFEST_FILE, store.QUANTIZER_CENTROIDS_FILE)
        if any((index.path / name).exists() for name in existing) and not overwrite:
            raise InvalidParameterError(
                f"{directory} already has a public quantizer; pass --overwrite to replace it"
            )
        source = require_public_file(public, data_is_public, "train the coarse quantizer")
        vectors = store.load_embeddings(public)
        quantizer: PublicQuantizer = train_public_quantizer(
            vectors, nlist, private_index=index, seed=seed
        )
        quantizer = replace(quantizer, source={**source, "rows": int(vectors.shape[0])})
        quantizer.save(directory)
        # every record's list, computed once here and memory-mapped by every later retrieval
        partition = IVFPartition(index, quantizer)
        partition.save()
        result = {"path": str(directory)}
        result.update({k: v for k, v in quantizer.manifest().items() if k != "centroids_sha256"})
        result["partition"] = store.PARTITION_MANIFEST_FILE
        if not as_json:  # one readable line instead of a dict
            src = result.pop("source")
            result["source"] = (f"{src['file']} ({src['rows']:,} rows, SHA-256 "
                                f"{src['sha256'][:16]}...), public per {src['declared_by']}")
        return result

    run_command(as_json, "public quantizer", compute)


RAY_SECURITY = (
    "SECURITY: Ray has no per-user authentication (at most a shared cluster token, "
    "RAY_AUTH_MODE=token in recent releases; none in older ones, CVE-2023-48022 'ShadowRay'). "
    "Anyone who reaches the cluster can call a shard actor and read raw private embeddings, "
    "bypassing the ledger: the Ray network must be private to the operator (bind to private "
    "addresses, firewall every Ray port, never expose the dashboard). See docs/scaling.md."
)


@app.command()
def shard(
    directory: Path = typer.Argument(..., metavar="DIR", help="The index to split (unchanged)."),
    shards: int = typer.Option(..., "--shards", help="Number of shards S (>= 1)."),
    out: Path = typer.Option(..., "--out", help="The sharded index directory to create."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Split the index at DIR into S shard indexes under --out, with a manifest (shards.json).

    Shard s holds a contiguous slice of the rows, byte for byte, with their ids and metadata;
    global record numbers are the row offsets. Each shard gets a copy of DIR's PUBLIC quantizer
    (one quantizer for all) and the IVF partition of its own rows. Every command that takes an
    index directory accepts the sharded one (all shards in one process); `dprdm retrieve
    --ray-address` spreads them over Ray actors. Create its ledger with `dprdm budget init OUT`.

    Example: dprdm index shard private_index --shards 4 --out private_index_4
    """
    from dprdm.retrieval.shards import shard_index

    run_command(as_json, "sharded index",
                lambda: shard_index(directory, out, shards).info())


SERVE_SHARDS_HELP = (
    "Start the shard actors of the sharded index at DIR on a running Ray cluster, detached and "
    "named, so that `dprdm retrieve DIR --ray-address ADDRESS` finds them. Shard i's actor needs "
    "one unit of the custom resource dprdm_shard_i (start the nodes with e.g. `ray start "
    "--address HEAD --resources '{\"dprdm_shard_0\": 1}'`) unless --no-shard-resources. The "
    "actors read the shard files from the same path on their node; each checks its file against "
    "the fingerprint in shards.json (size, sampled blocks, and the full SHA-256 when the mtime "
    "differs or with --full-hash) and refuses to serve a file that does not match. Stop them "
    "with ray.kill (or by stopping the cluster).\n\n" + RAY_SECURITY + "\n\n"
    "Example: dprdm index serve-shards private_index_4 --ray-address auto"
)


@app.command(name="serve-shards", help=SERVE_SHARDS_HELP)
def serve_shards(
    directory: Path = typer.Argument(..., metavar="DIR", help="A sharded index (shards.json)."),
    ray_address: str = typer.Option(
        ..., "--ray-address",
        help="The cluster: 'auto' or host:port / ray://host:port. " + RAY_PRIVATE_NETWORK),
    shard_resources: bool = typer.Option(
        True, "--shard-resources/--no-shard-resources",
        help="Pin shard i to nodes offering the custom resource dprdm_shard_i."),
    full_hash: bool = typer.Option(
        False, "--full-hash",
        help="Each actor recomputes its shard file's full SHA-256 (default: size and sampled "
             "blocks, the full hash only when the file's mtime differs from the recorded one)."),
    as_json: bool = JSON_OPTION,
) -> None:
    def compute() -> dict[str, Any]:
        from dprdm.retrieval.shards import ShardedIndex

        if ray_address == "local":
            raise InvalidParameterError("serve-shards needs a running cluster (--ray-address "
                                        "auto or an address): a local Ray ends with this command")
        sharded = ShardedIndex.open(directory)
        from dprdm.privacy import sharded_ray  # the one module that imports Ray

        sharded_ray.init_ray(ray_address)
        if shard_resources:
            available = sharded_ray.ray.cluster_resources()
            missing = [sharded_ray.resource_name(s.number) for s in sharded.shards
                       if available.get(sharded_ray.resource_name(s.number), 0) < 1]
            if missing:
                raise InvalidParameterError(
                    f"the cluster offers no {', '.join(missing)}: start nodes with `ray start "
                    "--resources` naming them, or pass --no-shard-resources")
        shards = sharded_ray.RayShards.start(sharded, detached=True, use_resources=shard_resources,
                                             full_hash=full_hash)
        return {"index": str(directory), "actors": [sharded_ray.actor_name(sharded, s.number)
                                                    for s in sharded.shards],
                "namespace": sharded_ray.NAMESPACE, "shards": len(shards.actors)}

    run_command(as_json, "shard actors started", compute)
