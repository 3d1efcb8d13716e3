"""`dprdm privacy`, `dprdm budget` and `dprdm retrieve` from the command line."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from dprdm.cli import app
from dprdm.privacy import MechanismParams, SqliteLedger, accounting, init_budget
from dprdm.privacy.noise import noise_grid
from dprdm.retrieval import build_index

runner = CliRunner()
PARAMS = MechanismParams(1.0, 0.5, 5)
PINNED = ["--k", "5", "--q", "0.5", "--sigma", "1.0"]


def run_json(*args):
    result = runner.invoke(app, [*args, "--json"])
    return result, (json.loads(result.stdout) if result.stdout.strip() else None)


def test_privacy_epsilon_json_matches_the_library():
    result, data = run_json("privacy", "epsilon", "--sigma", "0.2", "--q", "0.01", "--k", "18",
                            "--queries", "1000", "--delta", "1e-7")
    assert result.exit_code == 0
    assert len(result.stdout.strip().splitlines()) == 1
    assert data["epsilon"] == pytest.approx(
        accounting.epsilon_for(MechanismParams(0.2, 0.01, 18), 1000, 1e-7)
    )
    assert data["epsilon_rdp"] == pytest.approx(0.99688, rel=0.01)
    assert data["rdp_order"] == 25
    assert data["noise_multiplier"] == pytest.approx(1.8)


def test_privacy_calibrate_and_max_queries_are_consistent():
    _, calibrated = run_json("privacy", "calibrate", "--epsilon", "1", "--q", "0.01", "--k", "18",
                             "--queries", "1000", "--delta", "1e-7")
    sigma = calibrated["sigma"]
    assert calibrated["relative_tolerance"] == accounting.CALIBRATION_REL_TOL
    assert calibrated["epsilon"] <= 1.0
    _, budget = run_json("privacy", "max-queries", "--sigma", str(sigma), "--q", "0.01",
                         "--k", "18", "--epsilon", "1", "--delta", "1e-7")
    assert budget["queries"] >= 1000


@pytest.mark.parametrize("q", ["0", "1.5", "nan"])
def test_invalid_parameters_exit_2_with_a_clear_message(q):
    result = runner.invoke(app, ["privacy", "epsilon", "--sigma", "0.2", "--q", q, "--k", "18",
                                 "--queries", "10", "--delta", "1e-7"])
    assert result.exit_code == 2
    assert "q must be" in result.output


@pytest.fixture()
def private_index(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(300, 16)).astype(np.float32)
    build_index(vectors, tmp_path / "index")
    return tmp_path / "index"


def test_budget_init_show_and_retrieve(private_index, tmp_path):
    result, created = run_json("budget", "init", str(private_index), "--epsilon", "5",
                               "--delta", "1e-5", *PINNED, "--lam", "0.8")
    assert result.exit_code == 0, result.output
    assert created["epsilon_budget"] == 5 and created["queries"] == 0
    assert "warning" not in created
    assert created["mechanism"] == {"sigma": 1.0, "q": 0.5, "k": 5, "lam": 0.8,
                                    "noise_multiplier": 2.5}
    assert created["accountant"] == "pld"

    queries = np.random.default_rng(1).normal(size=(3, 16)).astype(np.float32)
    np.save(tmp_path / "q.npy", queries)
    result, report = run_json("retrieve", str(private_index), "--query-emb", str(tmp_path / "q.npy"),
                              "--lam", "0.8", "--out", str(tmp_path / "r.npy"))
    assert result.exit_code == 0, result.output
    released = np.load(tmp_path / "r.npy")
    assert released.shape == (3, 16) and released.dtype == np.float64
    assert report["queries"] == 3 and report["epsilon_this_call"] > 0
    # Nothing about records is reported: only budget figures, parameters and the noise's grid.
    assert set(report) == {"queries", "out", "sigma", "q", "k", "lam", "noise",
                           "epsilon_this_call", "epsilon_after_own_commit", "epsilon_spent",
                           "epsilon_remaining",
                           "queries_remaining"}
    assert report["noise"] == {"sampler": "dprdm-discrete-gaussian",
                               "grid": noise_grid(0.5, 5, 16)}

    assert (report["sigma"], report["q"], report["k"]) == (1.0, 0.5, 5)  # the pinned mechanism

    _, shown = run_json("budget", "show", str(private_index))
    assert shown["queries"] == 3
    assert shown["queries_remaining"] == report["queries_remaining"]
    assert shown["accountant"] == "pld" and shown["mechanism"]["k"] == 5


def test_retrieve_with_lam_1_writes_the_release_exactly_on_its_grid(private_index, tmp_path):
    init_budget(private_index, 50, 1e-5, MechanismParams(0.5, 0.5, 5))
    np.save(tmp_path / "q.npy", np.random.default_rng(4).normal(size=(5, 16)))
    result, report = run_json("retrieve", str(private_index), "--query-emb", str(tmp_path / "q.npy"),
                              "--out", str(tmp_path / "r.npy"))
    assert result.exit_code == 0, result.output
    released = np.load(tmp_path / "r.npy")
    assert released.dtype == np.float64
    units = released / report["noise"]["grid"]
    assert np.array_equal(units, np.round(units)) and np.any(units != 0)


def test_delta_above_one_over_n_warns(private_index):
    _, created = run_json("budget", "init", str(private_index), "--epsilon", "5",
                          "--delta", "0.01", *PINNED)
    assert "1/N" in created["warning"]


def test_retrieve_refuses_bad_input_and_spends_nothing(private_index, tmp_path):
    init_budget(private_index, 5, 1e-5, PARAMS)
    np.save(tmp_path / "wrong_dim.npy", np.ones((2, 7), dtype=np.float32))
    np.save(tmp_path / "nan.npy", np.full((2, 16), np.nan, dtype=np.float32))
    (tmp_path / "garbage.npy").write_bytes(b"not an npy file")
    good = tmp_path / "good.npy"
    np.save(good, np.ones((2, 16), dtype=np.float32))
    cases = [
        ["--query-emb", str(tmp_path / "wrong_dim.npy")],
        ["--query-emb", str(tmp_path / "nan.npy")],
        ["--query-emb", str(tmp_path / "garbage.npy")],
        ["--query-emb", str(good), "--lam", "1.5"],
        ["--query-emb", str(good), "--strategy", "magic"],
        ["--query-emb", str(good), "--out", str(tmp_path / "missing-dir" / "r.npy")],
        ["--query-emb", str(good), *PINNED],  # the mechanism is pinned: no per-call parameters
    ]
    for extra in cases:
        args = ["retrieve", str(private_index), "--out", str(tmp_path / "r.npy"), *extra]
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (extra, result.output)
        assert not (tmp_path / "r.npy").exists()
    assert SqliteLedger(private_index).summary().queries == 0


def test_retrieve_is_refused_when_the_budget_is_gone(private_index, tmp_path):
    _, ledger = init_budget(private_index, 5, 1e-5, PARAMS)
    remaining = ledger.remaining_queries(PARAMS)
    assert remaining > 0
    ledger.charge(PARAMS, remaining)
    np.save(tmp_path / "q.npy", np.ones((1, 16), dtype=np.float32))
    result = runner.invoke(app, ["retrieve", str(private_index), "--query-emb",
                                 str(tmp_path / "q.npy"), "--out", str(tmp_path / "r.npy")])
    assert result.exit_code == 2 and "budget exceeded" in result.output
    assert not (tmp_path / "r.npy").exists()


def test_retrieve_with_the_public_ivf_candidate_set(private_index, tmp_path):
    init_budget(private_index, 5, 1e-5, PARAMS)
    queries = np.random.default_rng(2).normal(size=(4, 16)).astype(np.float32)
    np.save(tmp_path / "q.npy", queries)
    args = ["retrieve", str(private_index), "--query-emb", str(tmp_path / "q.npy"),
            "--out", str(tmp_path / "r.npy"),
            "--strategy", "ivf-subsample", "--nprobe", "2"]
    # no public quantizer yet: refused before anything is charged
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "quantizer" in result.output
    assert SqliteLedger(private_index).summary().queries == 0
    np.save(tmp_path / "public.npy", np.random.default_rng(3).normal(size=(200, 16)))
    result, _ = run_json("index", "quantize", str(private_index), "--public",
                         str(tmp_path / "public.npy"), "--nlist", "4", "--data-is-public")
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*args[:-1], "9"])  # nprobe beyond nlist
    assert result.exit_code == 2 and "nprobe" in result.output
    assert SqliteLedger(private_index).summary().queries == 0
    result, report = run_json(*args)
    assert result.exit_code == 0, result.output
    assert report["queries"] == 4 and np.load(tmp_path / "r.npy").shape == (4, 16)
    assert SqliteLedger(private_index).summary().queries == 4


@pytest.mark.parametrize("sigma", ["1e-300", "1e300", "1e6"])
@pytest.mark.parametrize("command", ["max-queries", "epsilon"])
def test_extreme_sigma_is_a_json_error_with_exit_2(command, sigma):
    last = ["--epsilon", "10"] if command == "max-queries" else ["--queries", "10"]
    result, data = run_json("privacy", command, "--sigma", sigma, "--q", "0.1", "--k", "40",
                            *last, "--delta", "1e-5")
    assert result.exit_code == 2
    assert data["error"] == "invalid_parameter"
    assert "outside the supported range" in data["message"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--q", "1e-12"], "q must be >="),
        (["--k", "1000000"], "k must be <="),
        (["--delta", "1e-300"], "delta must be >="),
        (["--queries", "10000000000000"], "queries must be <="),
    ],
)
def test_calibrate_outside_the_supported_range_is_a_json_error(args, message):
    base = {"--epsilon": "1", "--q": "0.01", "--k": "18", "--queries": "1000", "--delta": "1e-7"}
    base.update(dict(zip(args[::2], args[1::2])))
    result, data = run_json("privacy", "calibrate", *[x for kv in base.items() for x in kv])
    assert result.exit_code == 2
    assert data["error"] == "invalid_parameter" and message in data["message"]


def test_max_queries_of_the_reproduced_case():
    # Took 45 s before issue 13 item 6 (dp_accounting's size ** T); the answer is the boundary.
    result, data = run_json("privacy", "max-queries", "--sigma", "2.5", "--q", "0.1", "--k", "40",
                            "--epsilon", "10", "--delta", "1e-5")
    assert result.exit_code == 0, result.output
    params = MechanismParams(2.5, 0.1, 40)
    assert data["epsilon_at_max"] <= 10
    assert accounting.epsilon_for(params, data["queries"] + 1, 1e-5) > 10
