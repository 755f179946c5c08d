"""The prior-hole study harness (`benchmarks/prior_hole.py`) runs in quick mode and writes a well-formed report."""

import json
import math

from benchmarks.common import parse_markdown_tables
from benchmarks.prior_hole import PriorHoleConfig, main, study_configs


def test_quick_run_writes_well_formed_tables(tmp_path):
    results = main(["--quick", "--output-dir", str(tmp_path), "--name", "ph"])
    text = (tmp_path / "ph.md").read_text()
    assert "QUICK smoke run" in text
    assert (tmp_path / "ph_w2_vs_nfe.png").stat().st_size > 0
    assert json.loads((tmp_path / "ph.json").read_text())["meta"]["quick"] is True
    tables = parse_markdown_tables(text)
    (task,) = results["tasks"]
    labels = list(results["tasks"][task]["configs"])
    nfes = results["meta"]["nfes"]
    w2_table, diag_table = tables
    assert w2_table[0][: 3 + len(nfes)] == ["config", "settings", "seeds", *[f"NFE {n}" for n in nfes]]
    assert [row[0] for row in w2_table[1:]] == labels
    for row in w2_table[1:]:
        assert len(row) == len(w2_table[0])
        values = [float(v) for v in row[3 : 3 + len(nfes)]]
        assert all(math.isfinite(v) and v > 0 for v in values)
    rf_row = w2_table[1]
    assert rf_row[0] == "RF" and float(rf_row[3 + len(nfes)]) == 1.0
    # every VRFM configuration has its diagnostics, with a sane number of active units and MMD floor
    assert [row[0] for row in diag_table[1:]] == [label for label in labels if label != "RF"]
    for row in diag_table[1:]:
        assert 0 <= int(float(row[2])) <= 8
        assert math.isfinite(float(row[6])) and abs(float(row[7])) < 0.1


def test_grid_labels_are_unique_and_describe_their_remedies():
    grid = study_configs()
    assert len({c.label for c in grid}) == len(grid)
    assert grid[0].latent_dim == 0
    text = PriorHoleConfig("x", learned_prior=True, prior_mix=0.3, kl_target=2.0, posterior_inputs=("x0", "x1"))
    assert "learned prior" in text.describe() and "prior_mix 0.3" in text.describe() and "q(x0,x1)" in text.describe()


def test_decodability_tells_informative_from_uninformative_latents():
    import torch

    from benchmarks.prior_hole import decodability

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 2, generator=g)
    informative = torch.cat([x.pow(2) - 1.0, torch.randn(1000, 6, generator=g)], dim=1)
    assert decodability(torch.cat([x, torch.randn(1000, 6, generator=g)], dim=1), x) > 0.99
    assert decodability(torch.randn(1000, 8, generator=g), x) < 0.05
    # a quadratic fit also reads x^2 from the features (here the signs of x stay hidden: R^2 of x itself is low)
    assert decodability(informative, x.pow(2)) > 0.99


def test_parallel_jobs_reproduce_the_sequential_run_and_add_the_fitted_prior_rows(tmp_path):
    argv = ["--quick", "--configs", "RF", "KL3 q(x1)", "--seeds", "0", "1", "--output-dir"]
    sequential = main([*argv, str(tmp_path / "one"), "--jobs", "1"])
    parallel = main([*argv, str(tmp_path / "two"), "--jobs", "2"])
    (task,) = sequential["tasks"]
    configs = sequential["tasks"][task]["configs"]
    assert list(configs) == ["RF", "KL3 q(x1)", "KL3 q(x1) +AP"], (
        "each VRFM model is also sampled with the fitted prior"
    )
    for label, config in configs.items():
        for seed, run in config["runs"].items():
            assert parallel["tasks"][task]["configs"][label]["runs"][seed]["w2"] == run["w2"], (label, seed)
    fitted = configs["KL3 q(x1) +AP"]["runs"]["0"]
    assert fitted["w2"] == fitted["w2_aggprior"] != configs["KL3 q(x1)"]["runs"]["0"]["w2"]
