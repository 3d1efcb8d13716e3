"""Request and response bodies of the HTTP API (pydantic models, shown in /docs).

Owns what a client may send and what it gets back. Requests are strict (no type coercion, no
unknown fields: the mechanism parameters k, q, sigma, lam are the operator's and cannot be
sent). The operator's own limits (max images, max steps) are checked by the app on top of the
hard bounds here. Responses carry images and aggregate budget figures only.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dprdm.rdm import MAX_PROMPT_CHARS
from dprdm.service.config import MAX_IMAGES_LIMIT, MAX_STEPS_LIMIT


class GenerateRequest(BaseModel):
    """One prompt; all n images come from one conditioning vector (one private query)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS,
                        examples=["red apple"], description="The text prompt.")
    n: int = Field(1, ge=1, le=MAX_IMAGES_LIMIT, description="Images (free after the query).")
    guidance: float = Field(3.0, ge=0.0, le=30.0, description="Classifier-free guidance scale.")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS_LIMIT,
                              description="Diffusion steps (default: the operator's).")
    seed: int | None = Field(None, ge=0, le=2**63 - 1,
                             description="Seeds the diffusion sampler only, never the privacy "
                                         "noise (which comes from OS entropy).")
    public_only: bool = Field(False, description="Use no private data (if the operator allows).")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("the prompt is blank")
        if any(ord(ch) < 32 and ch not in "\t\n\r" for ch in prompt):
            raise ValueError("the prompt contains control characters")
        return prompt.strip()


class BudgetFigures(BaseModel):
    epsilon_budget: float
    delta: float
    epsilon_spent: float
    epsilon_remaining: float
    queries_spent: int
    queries_remaining: int


class KeyFigures(BaseModel):
    name: str
    quota: int | None
    used: int
    quota_remaining: int | None


class BudgetResponse(BudgetFigures):
    mechanism: dict[str, float | int] = Field(description="The operator-fixed (sigma, q, k, lam).")
    public_only_enabled: bool
    key: KeyFigures | None = None


class Image(BaseModel):
    png_base64: str
    width: int
    height: int


class GenerateResponse(BudgetFigures):
    mode: str = Field(description="'dp' or 'public-only'.")
    images: list[Image]
    steps: int
    guidance: float
    content_guidance: float | None = Field(
        None, description="Split guidance's content scale, set by the operator (demo generator; "
                          "null: plain classifier-free guidance).")
    seed: int | None
    key: KeyFigures | None = None


class Info(BaseModel):
    service: str
    version: str
    mechanism: dict[str, float | int]
    public_only_enabled: bool
    keyless_local: bool
    limits: dict[str, int]
    # releases averaged in the operator's style estimate that each DP release is shrunk towards
    # (free post-processing); None: each release is used as drawn
    style_estimate_releases: int | None = None


class Error(BaseModel):
    error: str
    message: str
