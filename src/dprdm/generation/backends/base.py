"""The generator-backend contract: one conditioning space, prompts/images in, images out.

Owns what every generator backend promises dprdm (the demo model, Kandinsky 2.2, Stable unCLIP,
IP-Adapter), so that :class:`dprdm.rdm.RetrievalAugmentedGenerator` composes any of them the same
way::

    x = backend.embed_prompts(prompts)          # public query, unit rows in the backend's space
    r = PrivateRetrieval(...).release(x)        # the DP release (charged first), ~unit norm
    c = lam * r + (1 - lam) * x                 # dprdm's mix (dprdm.conditioning), unit space
    images = backend.render(c, prompts, ...)    # -> backend.to_model_scale(c) -> the pipeline

* :class:`ConditioningSpace` -- which CLIP image tower the vectors live in: family, dimension and a
  fingerprint of the tower's config and weights. An index records the space it was embedded in
  (``conditioning_space.json`` beside its manifest); a backend refuses an index from another one.
* :class:`RuntimeOptions` -- device (auto/cpu/cuda/mps), dtype (float16 on CUDA by default),
  attention slicing, model CPU offload, batch size.
* :class:`GeneratorBackend` -- ``embed_images`` (private or public images -> unit rows),
  ``embed_prompts`` (the public query x), ``to_model_scale`` (free post-processing of a unit-space
  condition into the raw embedding scale the model was trained on, from PUBLIC statistics only),
  ``model_inputs`` (the exact keyword arguments handed to the diffusers pipeline) and ``render``.
* :func:`require_layout` -- local folders only: a missing or wrong folder is refused with the
  layout expected and the ``huggingface-cli download`` command to run on a connected machine.

The privacy noise never passes through here; a user seed reaches only the samplers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dprdm.errors import DprdmError, InvalidParameterError
from dprdm.files import write_bytes_atomically

SPACE_FILE = "conditioning_space.json"
FINGERPRINT_SAMPLES = 4096  # values hashed per tensor (strided sample, rounded to float16)


class BackendLoadError(DprdmError):
    """A generator backend could not be loaded from the folders given."""

    code = "model_unavailable"


class SpaceMismatchError(DprdmError):
    """An index was embedded with another image tower than the backend's."""

    code = "invalid_parameter"


# ---------------------------------------------------------------------------------------------
# the conditioning space


@dataclass(frozen=True)
class ConditioningSpace:
    """The space conditions live in: the image tower's family, output dimension and fingerprint."""

    family: str
    dim: int
    fingerprint: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ConditioningSpace:
        try:
            return cls(str(data["family"]), int(data["dim"]), str(data["fingerprint"]))
        except (KeyError, TypeError, ValueError):
            raise DprdmError(f"{SPACE_FILE} must hold family, dim and fingerprint") from None

    def to_bytes(self) -> bytes:
        """The contents of ``SPACE_FILE`` (for ``build_index(..., extra_files=...)``)."""
        return (json.dumps(self.to_dict(), indent=1) + "\n").encode()

    def save(self, index_dir: str | os.PathLike) -> None:
        """Record this space beside an index (atomically)."""
        write_bytes_atomically(Path(index_dir) / SPACE_FILE, self.to_bytes())

    @classmethod
    def load(cls, index_dir: str | os.PathLike) -> ConditioningSpace | None:
        """The space an index records, or None when it records none (an older index)."""
        path = Path(index_dir) / SPACE_FILE
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except ValueError:
            raise DprdmError(f"{path} is not valid JSON") from None

    def check_index(self, index_dir: str | os.PathLike, dim: int, what: str = "private",
                    require_record: bool = True) -> None:
        """Refuse an index embedded with another tower (call before anything is charged)."""
        if dim != self.dim:
            raise SpaceMismatchError(
                f"the {what} index holds {dim}-d embeddings but the generator's image tower "
                f"({self.family}) makes {self.dim}-d ones: embed the images with this backend")
        recorded = ConditioningSpace.load(index_dir)
        if recorded is None:
            if require_record:
                raise SpaceMismatchError(
                    f"the {what} index at {index_dir} records no encoder ({SPACE_FILE}); embed "
                    f"its images with this generator's image tower ({self.family}) and rebuild it")
            return
        if recorded.fingerprint != self.fingerprint:
            raise SpaceMismatchError(
                f"the {what} index was embedded with another image tower ({recorded.family}, "
                f"fingerprint {recorded.fingerprint[:12]}) than this generator's ({self.family}, "
                f"fingerprint {self.fingerprint[:12]}): embed the images with this backend")


def fingerprint(config: dict, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of a tower's config and weights, independent of device and of float16/32 storage.

    Each tensor contributes its name, shape and a strided sample of at most
    ``FINGERPRINT_SAMPLES`` values rounded to float16 (cheap even for ViT-bigG, and the same
    whether the weights were loaded as float32 or float16).
    """
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        flat = tensor.reshape(-1)
        step = max(1, math.ceil(flat.numel() / FINGERPRINT_SAMPLES))
        sample = flat[::step].to(device="cpu", dtype=torch.float32).to(torch.float16)
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


VISION_CONFIG_KEYS = ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                      "num_attention_heads", "image_size", "patch_size", "hidden_act",
                      "layer_norm_eps")


def clip_vision_space(model: torch.nn.Module, label: str = "clip") -> ConditioningSpace:
    """The space of a CLIP image tower: a ``CLIPVisionModelWithProjection`` or a full
    ``CLIPModel`` (only its vision_model.* and visual_projection.* weights count, so both forms
    of the same tower have the same fingerprint)."""
    config = getattr(model.config, "vision_config", model.config)
    projection_dim = int(getattr(model.config, "projection_dim", None)
                         or getattr(config, "projection_dim"))
    summary = {key: getattr(config, key, None) for key in VISION_CONFIG_KEYS}
    summary["projection_dim"] = projection_dim
    tensors = {name: value for name, value in model.state_dict().items()
               if name.startswith(("vision_model.", "visual_projection."))}
    family = (f"{label} ViT {config.hidden_size}w/{config.num_hidden_layers}L/"
              f"patch{config.patch_size}@{config.image_size}px -> {projection_dim}")
    return ConditioningSpace(family, projection_dim, fingerprint(summary, tensors))


# ---------------------------------------------------------------------------------------------
# runtime options


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise InvalidParameterError(f"device must be auto, cpu, cuda or mps, got {device!r}")
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidParameterError("device cuda was asked for but no CUDA GPU is available")
    return device


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how a backend runs. ``dtype="auto"``: float16 on CUDA, float32 elsewhere."""

    device: str = "auto"
    dtype: str = "auto"
    attention_slicing: bool = False
    cpu_offload: bool = False
    batch_size: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", resolve_device(self.device))
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise InvalidParameterError(f"dtype must be auto, float32, float16 or bfloat16, "
                                        f"got {self.dtype!r}")
        if self.dtype == "auto":
            object.__setattr__(self, "dtype",
                               "float16" if self.device.startswith("cuda") else "float32")
        size = self.batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidParameterError(f"batch_size must be a positive integer, got {size!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def place_pipeline(pipe, options: RuntimeOptions):
    """Move a diffusers pipeline per `options` (offload needs the `accelerate` package)."""
    if options.cpu_offload:
        try:
            pipe.enable_model_cpu_offload(device=options.device)
        except (ImportError, RuntimeError, ValueError) as error:
            raise BackendLoadError(f"model CPU offload is unavailable here ({error}); install "
                                   "`accelerate` or run without --cpu-offload") from None
    else:
        pipe.to(options.device)
    if options.attention_slicing:
        pipe.enable_attention_slicing()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------
# local folders only


def require_layout(folder: str | os.PathLike | None, what: str, repo: str,
                   needed: Sequence[str]) -> Path:
    """`folder` as a Path when every entry of `needed` exists in it, else a clear error naming
    the layout and the command that fetches it on a connected machine."""
    fetch = f"huggingface-cli download {repo} --local-dir DIR"
    layout = ", ".join(needed)
    if folder is None or not str(folder):
        raise BackendLoadError(f"no {what} folder given: it must hold {layout} "
                               f"(on a connected machine: `{fetch}`, then copy DIR here)")
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise BackendLoadError(f"no {what} at {root}: the folder does not exist; it must hold "
                               f"{layout} (on a connected machine: `{fetch}`)")
    missing = [entry for entry in needed if not (root / entry).exists()]
    if missing:
        raise BackendLoadError(f"{root} is not a {what} folder: missing {', '.join(missing)} "
                               f"(expected {layout}; on a connected machine: `{fetch}`)")
    return root


def loading_error(what: str, root: Path, error: Exception) -> BackendLoadError:
    return BackendLoadError(f"cannot load the {what} from {root}: {error}")


# ---------------------------------------------------------------------------------------------
# shared steps


def unit_rows(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """float32 rows of unit L2 norm (a zero row stays zero)."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x)
    return torch.nn.functional.normalize(t.float(), dim=-1, eps=1e-12).cpu().numpy()


def rescale(conditions: np.ndarray, norm: float) -> np.ndarray:
    """Each row's direction kept, its length set to `norm` (the model's raw embedding scale)."""
    return (unit_rows(conditions) * np.float32(norm)).astype(np.float32)


def check_conditions(conditions: object, dim: int) -> np.ndarray:
    c = np.asarray(conditions, dtype=np.float32)
    if c.ndim != 2 or c.shape[1] != dim or c.shape[0] < 1:
        raise InvalidParameterError(f"conditions must have shape (P, {dim}), got {c.shape}")
    if not np.isfinite(c).all():
        raise InvalidParameterError("conditions contain NaN or infinite values")
    return c


def check_render_args(n: int, guidance: float, steps: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidParameterError(f"n must be a positive integer, got {n!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidParameterError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance < 0:
        raise InvalidParameterError(f"guidance must be a finite number >= 0, got {guidance!r}")


def seeded(seed: int | None) -> torch.Generator | None:
    """The sampler's generator (CPU, so one seed gives the same noise on every device)."""
    return torch.Generator().manual_seed(int(seed)) if seed is not None else None


def to_uint8(images) -> np.ndarray:
    """A pipeline's ``output_type="np"`` images (float in [0, 1]) as uint8 (B, H, W, 3)."""
    array = np.asarray(images, dtype=np.float32)
    return np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# the contract


class GeneratorBackend(ABC):
    """A public, frozen generator conditioned on vectors in one CLIP image space."""

    name: str = "backend"
    rows_per_call: int | None = None  # condition rows per pipeline call (None: options.batch_size)
    space: ConditioningSpace
    options: RuntimeOptions

    @property
    def dim(self) -> int:
        return self.space.dim

    @abstractmethod
    def embed_images(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, dim) unit rows, with the backend's image tower."""

    @abstractmethod
    def embed_prompts(self, prompts: list[str]) -> np.ndarray:
        """The public query x of each prompt: float32 (P, dim) unit rows in the same space."""

    @abstractmethod
    def to_model_scale(self, conditions: np.ndarray) -> np.ndarray:
        """(P, dim) unit-space conditions -> the raw embedding scale the model expects (free)."""

    @abstractmethod
    def model_inputs(self, conditions: np.ndarray, prompts: list[str] | None, n: int,
                     guidance: float, steps: int) -> dict:
        """The keyword arguments of one pipeline call for (P, dim) UNIT-space conditions (it
        applies :meth:`to_model_scale`); one image per row of ``repeat(conditions, n)``."""

    @property
    @abstractmethod
    def pipeline(self):
        """The diffusers pipeline :meth:`render` calls."""

    def render(self, conditions: np.ndarray, prompts: list[str] | None = None, n: int = 1,
               guidance: float = 4.0, steps: int = 50, seed: int | None = None) -> np.ndarray:
        """uint8 (P, n, H, W, 3): n images per condition row, in batches of options.batch_size."""
        conditions = check_conditions(conditions, self.dim)
        check_render_args(n, guidance, steps)
        if prompts is not None and len(prompts) != len(conditions):
            raise InvalidParameterError("give one prompt per condition row")
        generator = seeded(seed)
        per_batch = self.rows_per_call or max(1, self.options.batch_size // n)
        out = []
        for start in range(0, len(conditions), per_batch):
            chunk = conditions[start:start + per_batch]
            chunk_prompts = prompts[start:start + per_batch] if prompts is not None else None
            kwargs = self.model_inputs(chunk, chunk_prompts, n, guidance, steps)
            kwargs["generator"] = generator
            with torch.no_grad():
                images = self._call_pipeline(kwargs)
            out.append(images.reshape(len(chunk), n, *images.shape[1:]))
        return np.concatenate(out)

    def _call_pipeline(self, kwargs: dict) -> np.ndarray:
        return to_uint8(self.pipeline(**kwargs, output_type="np").images)

    def describe(self) -> dict:
        return {"generator": self.name, "space": self.space.to_dict(),
                "device": self.options.device, "dtype": self.options.dtype}


def load_pipeline(pipeline_class, root: Path, what: str, options: RuntimeOptions, **kwargs):
    """``pipeline_class.from_pretrained(root)`` from local files only, quietly, in options.dtype."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    shown = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        return pipeline_class.from_pretrained(root, local_files_only=True,
                                              dtype=options.torch_dtype,
                                              low_cpu_mem_usage=False, **kwargs)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as error:
        raise loading_error(what, root, error) from None
    finally:
        if shown:
            diffusers_logging.enable_progress_bar()


class CLIPEncoderMethods:
    """The embedding and scale methods of a backend conditioned through a dprdm CLIP encoder
    (``self.encoder``) whose releases are rescaled to a raw CLIP norm from public statistics
    (``self.raw_norm``): Stable unCLIP and IP-Adapter. Mixed in before :class:`GeneratorBackend`."""

    def embed_images(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        return self.encoder.encode_images(images, batch_size or max(self.options.batch_size, 32))

    def embed_prompts(self, prompts: list[str]) -> np.ndarray:
        return self.encoder.encode_text(list(prompts))

    def to_model_scale(self, conditions: np.ndarray) -> np.ndarray:
        return rescale(check_conditions(conditions, self.dim), self.raw_norm)
