"""Pooling a batch's DP releases (dprdm.conditioning.pool_releases) and its place in generation.

The statistical tests simulate releases (aggregate + Gaussian noise) with a seeded numpy
generator: they test the estimator, not the mechanism, whose noise comes from the OS.
"""

from __future__ import annotations

import numpy as np
import pytest

from dprdm.conditioning import interpolate, pool_releases
from dprdm.errors import InvalidParameterError
from dprdm.privacy import InMemoryLedger
from dprdm.rdm import MechanismSettings, RetrievalAugmentedGenerator
from dprdm.retrieval import build_index

from _release_support import (DIM, SIGMA, TextOnlyBackend, one_style_records, record_releases,
                              unit)

BATCH = 32  # the eval's prompts per call


def simulate(aggregates: np.ndarray, rng: np.random.Generator, trials: int):
    """Mean squared error per release of the raw and the pooled releases, and the mean b."""
    raw = pooled = kept = 0.0
    for _ in range(trials):
        released = aggregates + rng.normal(0.0, SIGMA, aggregates.shape)
        estimate, b = pool_releases(released, SIGMA)
        raw += np.mean(np.sum((released - aggregates) ** 2, axis=1)) / trials
        pooled += np.mean(np.sum((estimate - aggregates) ** 2, axis=1)) / trials
        kept += b / trials
    return raw, pooled, kept


def test_a_lone_release_or_no_noise_is_left_as_it_is():
    rng = np.random.default_rng(0)
    one = rng.normal(size=(1, DIM)).astype(np.float32)
    out, kept = pool_releases(one, SIGMA)
    assert kept == 1.0 and np.array_equal(out, one) and out is not one
    many = rng.normal(size=(5, DIM))
    out, kept = pool_releases(many, 0.0)
    assert kept == 1.0 and np.array_equal(out, many)


def test_alike_aggregates_are_pooled_and_the_noise_mostly_cancels():
    """Aggregates near one centroid (one private style): b near 0, error down many-fold."""
    rng = np.random.default_rng(1)
    centroid = 0.7 * unit(rng.normal(size=DIM))
    aggregates = centroid + 0.01 * rng.normal(size=(BATCH, DIM))
    raw, pooled, kept = simulate(aggregates, rng, trials=200)
    assert raw == pytest.approx(SIGMA**2 * DIM, rel=0.05)  # the noise itself: 0.49
    assert kept < 0.1
    assert pooled < 0.15 * raw


def test_aggregates_far_apart_keep_their_own():
    rng = np.random.default_rng(2)
    aggregates = unit(rng.normal(size=(BATCH, DIM)))  # spread 1 against noise 0.49
    raw, pooled, kept = simulate(aggregates, rng, trials=100)
    assert 0.55 < kept < 0.8  # ~ 1 - 0.49 / (1 + 0.49)
    assert pooled < raw


def test_pooling_never_costs_on_average_however_alike_the_aggregates():
    """James-Stein towards the grand mean dominates the raw releases when (P - 1) d > 2."""
    rng = np.random.default_rng(3)
    for spread in (0.0, 0.3, 0.7, 2.0):
        aggregates = 0.5 * unit(rng.normal(size=DIM)) + spread * unit(
            rng.normal(size=(8, DIM))) * rng.random((8, 1))
        raw, pooled, _ = simulate(aggregates, rng, trials=300)
        assert pooled < raw, spread


def test_the_dtype_is_kept():
    released = np.random.default_rng(4).normal(size=(6, DIM)).astype(np.float32)
    out, _ = pool_releases(released, SIGMA)
    assert out.dtype == np.float32 and out.shape == released.shape


@pytest.mark.parametrize("released, sigma, message", [
    (np.zeros(DIM), SIGMA, "must be"),
    (np.zeros((3, DIM)), -0.1, "sigma"),
    (np.zeros((3, DIM)), float("nan"), "sigma"),
    (np.zeros((3, DIM)), True, "sigma"),
])
def test_bad_input_is_refused(released, sigma, message):
    with pytest.raises(InvalidParameterError, match=message):
        pool_releases(released, sigma)


# -- in generation: RetrievalAugmentedGenerator.conditions -----------------------------------------

@pytest.fixture()
def private(tmp_path):
    return build_index(one_style_records(), tmp_path / "private")


def rag_with(private, pool, releases: list):
    settings = MechanismSettings(sigma=SIGMA, q=0.5, k=10, lam=0.75)
    ledger = InMemoryLedger(epsilon=1e4, delta=1e-6)
    rag = RetrievalAugmentedGenerator(backend=TextOnlyBackend(), private_index=private,
                                      ledger=ledger, settings=settings, pool=pool)
    record_releases(rag, releases)
    return rag, ledger


PROMPTS = [f"prompt {i}" for i in range(12)]


def test_dp_conditions_mix_the_pooled_releases(private):
    releases: list = []
    rag, ledger = rag_with(private, True, releases)
    pooling: dict = {}
    conditions = rag.conditions(PROMPTS, public_only=False, pooling=pooling)
    pooled, kept = pool_releases(releases[0], SIGMA)
    text = TextOnlyBackend().embed_prompts(PROMPTS)
    np.testing.assert_allclose(conditions, interpolate(pooled, text, 0.75), atol=1e-6)
    assert pooling == {"releases": 12, "kept": round(kept, 4), "towards": "call mean"}
    assert kept < 0.5
    assert ledger.summary().queries == 12  # pooling is free: one charge per prompt, as before


def test_without_pooling_each_release_is_mixed_as_it_came(private):
    releases: list = []
    rag, ledger = rag_with(private, False, releases)
    pooling: dict = {}
    conditions = rag.conditions(PROMPTS, public_only=False, pooling=pooling)
    text = TextOnlyBackend().embed_prompts(PROMPTS)
    np.testing.assert_allclose(conditions, interpolate(releases[0], text, 0.75), atol=1e-6)
    assert pooling == {} and ledger.summary().queries == 12


def test_a_pool_setting_that_is_not_a_bool_is_refused(private):
    with pytest.raises(InvalidParameterError, match="pool"):
        rag_with(private, "yes", [])


def test_public_only_mixes_at_the_callers_then_the_generators_then_the_private_lam(private):
    settings = MechanismSettings(sigma=SIGMA, q=0.5, k=10, lam=0.75)
    text = TextOnlyBackend().embed_prompts(PROMPTS)

    def public_only(backend, **kwargs) -> np.ndarray:
        rag = RetrievalAugmentedGenerator(backend=backend, settings=settings,
                                          public_index=private, **kwargs)
        return rag.conditions(PROMPTS, public_only=True)

    from dprdm.rdm import neighbour_mean

    neighbours = neighbour_mean(private, text, 10)
    plain = TextOnlyBackend()
    np.testing.assert_allclose(public_only(plain), interpolate(neighbours, text, 0.75), atol=1e-6)
    recording = TextOnlyBackend()
    recording.public_lam = 0.25  # what a generator records (DemoBackend.public_lam)
    np.testing.assert_allclose(public_only(recording), interpolate(neighbours, text, 0.25),
                               atol=1e-6)
    np.testing.assert_allclose(public_only(recording, public_lam=0.5),
                               interpolate(neighbours, text, 0.5), atol=1e-6)
    with pytest.raises(InvalidParameterError, match="lam"):
        public_only(recording, public_lam=2.0)


def test_the_demo_pair_of_encoder_and_pipeline_brings_its_recorded_public_lam(private):
    from dprdm.encoders import load_encoder
    from dprdm.generation import DEFAULT_DIR, RetrievalDiffusionPipeline

    rag = RetrievalAugmentedGenerator(load_encoder("demo"),
                                      RetrievalDiffusionPipeline.from_pretrained(DEFAULT_DIR))
    assert rag.public_lam_used == 0.25  # the shipped generator's model_index.json
