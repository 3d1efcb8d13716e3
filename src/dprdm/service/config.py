"""What the operator fixes when the service starts: :class:`ServiceConfig`.

Owns the service's settings and where they come from. Precedence, highest first: command-line
flags, a config file (``--config FILE``, TOML or JSON, the same keys as :class:`ServiceConfig`,
plus ``lam``, and ``k``/``q``/``sigma`` which may only repeat the pinned mechanism).

The mechanism (sigma, q, k) comes from the index's ledger, where the operator pinned it with
``dprdm budget init`` (or ``budget set-mechanism``); ``k``/``q``/``sigma`` given here that differ
from it are refused. Clients can never choose it: parameters picked adaptively (for instance
after looking at earlier outputs) are a choice made with private information that PLD
composition does not cover. The mix lam (post-processing, free) defaults to the ledger's.

``allowed_hosts`` (``--allowed-host``) and ``docs`` (``--docs``) belong to the HTTP front door:
see :mod:`dprdm.service.guard` for the Host/Origin policy. ``ray_address`` (``--ray-address``)
runs a sharded index's shards as Ray actors (docs/scaling.md); without it they run in-process.
``content_guidance`` (``--content-guidance``, demo generator) turns on split guidance for every
request (docs/generator.md): an operator setting, like the generator itself. ``pool``
(``--pool/--no-pool``) shrinks every request's release towards the index's stored style estimate
when the operator made one (``dprdm budget style-estimate``; docs/privacy.md): free.

The config travels to uvicorn worker processes as JSON in ``DPRDM_SERVICE_CONFIG``.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from dprdm.errors import DprdmError, InvalidParameterError
from dprdm.rdm import MAX_PROMPT_CHARS, MechanismSettings

CONFIG_ENV = "DPRDM_SERVICE_CONFIG"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
MAX_IMAGES_LIMIT = 16  # hard ceiling of the operator's --max-images
MAX_STEPS_LIMIT = 1000


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the service needs to start; validated on construction."""

    index_dir: Path
    settings: MechanismSettings
    ledger_url: str | None = None  # a postgresql:// ledger shared by replicas (default: SQLite)
    # a sharded index only: its shards on Ray ("local", "auto", host:port); None: in-process
    ray_address: str | None = None
    public_index_dir: Path | None = None
    # the generator (dprdm.generation.backends.GeneratorChoice; `dprdm serve --generator ...`)
    generator: str = "demo"
    encoder: str | None = None
    model_dir: Path | None = None
    prior_dir: Path | None = None
    adapter_file: Path | None = None
    device: str = "auto"
    attention_slicing: bool = False
    cpu_offload: bool = False
    batch_size: int = 8
    image_size: int | None = None
    # demo generator only: split guidance's content scale (None: plain classifier-free guidance)
    content_guidance: float | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    allow_public_only: bool = False
    keyless_local: bool = False
    max_images: int = 4
    max_steps: int = 100
    default_steps: int = 50
    max_body_bytes: int = 16 * 1024
    torch_threads: int | None = None
    allowed_hosts: tuple[str, ...] = ()
    docs: bool = False
    pool: bool = True  # shrink releases towards the index's style estimate, when it has one

    def __post_init__(self) -> None:
        object.__setattr__(self, "index_dir", Path(self.index_dir))
        if self.public_index_dir is not None:
            object.__setattr__(self, "public_index_dir", Path(self.public_index_dir))
        for key in ("model_dir", "prior_dir", "adapter_file"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, Path(getattr(self, key)))
        self.generator_choice()  # validates the generator settings
        settings = self.backend_settings()  # validates content_guidance
        object.__setattr__(self, "content_guidance", settings.get("content_guidance"))
        _whole("port", self.port, 0, 65535)
        _whole("workers", self.workers, 1, 64)
        _whole("max_images", self.max_images, 1, MAX_IMAGES_LIMIT)
        _whole("max_steps", self.max_steps, 1, MAX_STEPS_LIMIT)
        _whole("default_steps", self.default_steps, 1, self.max_steps)
        _whole("max_body_bytes", self.max_body_bytes, 1024, 1 << 20)
        if self.torch_threads is not None:
            _whole("torch_threads", self.torch_threads, 1, 256)
        self._check_ray_address()
        if not isinstance(self.pool, bool):
            raise InvalidParameterError(f"pool must be true or false, got {self.pool!r}")
        if self.keyless_local and self.host not in LOOPBACK_HOSTS:
            raise InvalidParameterError(
                "keyless local mode only listens on a loopback address (127.0.0.1, localhost, "
                f"::1), not {self.host}: every client would spend the budget without a key"
            )
        self._check_allowed_hosts()

    def backend_settings(self) -> dict[str, float]:
        """Settings for :meth:`GeneratorChoice.load_backend` beyond the generator flags."""
        from dprdm.generation.backends.demo import split_guidance

        return split_guidance(self.content_guidance, self.generator)

    def _check_ray_address(self) -> None:
        from dprdm.retrieval.shards import is_sharded

        address = self.ray_address
        if address is None:
            return
        if not isinstance(address, str) or not address.strip():
            raise InvalidParameterError("ray_address must be 'local', 'auto' or a cluster address")
        if not is_sharded(self.index_dir):
            raise InvalidParameterError("--ray-address needs a sharded index (dprdm index shard)")
        if address == "local" and self.workers > 1:
            raise InvalidParameterError(
                "--ray-address local starts a Ray of its own in every worker: with --workers > 1 "
                "start the shard actors once on a cluster (`dprdm index serve-shards`) and give "
                "its address")

    def _check_allowed_hosts(self) -> None:
        from dprdm.service.guard import ANY_HOST, WILDCARD_BINDS, split_host

        allowed = self.allowed_hosts
        if not isinstance(allowed, (list, tuple)) or not all(isinstance(h, str) for h in allowed):
            raise InvalidParameterError("allowed_hosts must be a list of host names")
        allowed = tuple(h.strip().lower() for h in allowed)
        object.__setattr__(self, "allowed_hosts", allowed)
        for entry in allowed:
            if entry != ANY_HOST and split_host(entry) is None:
                raise InvalidParameterError(
                    f"--allowed-host {entry!r} is not a host name: give NAME or NAME:PORT "
                    "(an IPv6 address in brackets), or '*'")
        if self.keyless_local and allowed:
            raise InvalidParameterError(
                "keyless local mode answers only for the loopback names (localhost, 127.0.0.1, "
                "[::1]) on its port: --allowed-host would let other sites' pages spend the budget")
        if self.host in WILDCARD_BINDS and not allowed:
            raise InvalidParameterError(
                f"listening on {self.host or 'every address'} accepts requests for any name: give "
                "the names clients use with --allowed-host NAME (repeatable; NAME:PORT for one "
                "port), or --allowed-host '*' to answer for any Host (no DNS-rebinding "
                "protection)")

    def generator_choice(self):
        """The generator this service runs, as every command builds it."""
        from dprdm.generation.backends.choice import GeneratorChoice

        return GeneratorChoice(generator=self.generator, model=self.model_dir,
                               prior=self.prior_dir, encoder=self.encoder,
                               adapter=self.adapter_file, device=self.device,
                               attention_slicing=self.attention_slicing,
                               cpu_offload=self.cpu_offload, batch_size=self.batch_size,
                               image_size=self.image_size)

    @property
    def threads(self) -> int:
        """Torch threads per worker: given, or the cores shared out between the workers."""
        if self.torch_threads is not None:
            return self.torch_threads
        return max(1, (os.cpu_count() or 1) // self.workers)

    @property
    def max_prompt_chars(self) -> int:
        return MAX_PROMPT_CHARS

    def to_json(self) -> str:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, Path):
                data[key] = str(value)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> ServiceConfig:
        data = json.loads(text)
        data["settings"] = MechanismSettings(**data["settings"])
        data["allowed_hosts"] = tuple(data.get("allowed_hosts", ()))
        return cls(**data)

    @classmethod
    def from_env(cls) -> ServiceConfig:
        text = os.environ.get(CONFIG_ENV)
        if not text:
            raise DprdmError(f"{CONFIG_ENV} is not set: start the service with `dprdm serve`")
        return cls.from_json(text)


def _whole(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidParameterError(f"{name} must be a whole number in [{low}, {high}]")


MECHANISM_KEYS = ("k", "q", "sigma", "lam")
FILE_KEYS = {f.name for f in fields(ServiceConfig)} - {"settings"} | set(MECHANISM_KEYS)


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings of a TOML or JSON config file (unknown keys are an error)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidParameterError(f"config file {path} does not exist")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, tomllib.TOMLDecodeError) as error:
        raise InvalidParameterError(f"config file {path} is not valid: {error}") from None
    if not isinstance(data, dict):
        raise InvalidParameterError(f"config file {path} must hold one table/object")
    unknown = sorted(set(data) - FILE_KEYS)
    if unknown:
        raise InvalidParameterError(f"unknown keys in {path}: {', '.join(unknown)}")
    return data


def build_config(options: dict[str, Any], config_file: Path | None = None) -> ServiceConfig:
    """Merge flags (`options`, None = not given) over a config file into one
    :class:`ServiceConfig`, with the mechanism pinned in the index's (verified) ledger."""
    from dprdm.privacy import open_private_index

    merged: dict[str, Any] = read_config_file(config_file) if config_file is not None else {}
    merged.update({key: value for key, value in options.items() if value is not None})
    if merged.get("index_dir") is None:
        raise InvalidParameterError("give --index DIR (or --demo, or index_dir in --config)")
    _, ledger = open_private_index(Path(merged["index_dir"]), merged.get("ledger_url"))
    lam = merged.get("lam")
    settings = MechanismSettings.from_ledger(ledger, None if lam is None else float(lam))
    for key in ("k", "q", "sigma"):
        given = merged.get(key)
        if given is not None and float(given) != float(getattr(settings, key)):
            raise InvalidParameterError(
                f"{key}={given} differs from the mechanism pinned in the index's ledger "
                f"(k={settings.k}, q={settings.q:g}, sigma={settings.sigma:.6g}); the service "
                "uses the pinned one: drop the flag, or change the mechanism with `dprdm budget "
                "set-mechanism`"
            )
    kwargs = {key: value for key, value in merged.items() if key not in MECHANISM_KEYS}
    return ServiceConfig(settings=settings, **kwargs)
