import collections
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from device_waits import DeviceWaits, count_host_reads

from diffusers_vrfm import VRFMMLPModel, VRFMPipeline, VRFMPosteriorEncoder, VRFMScheduler, predicted_end_point
from diffusers_vrfm.hub import remote_code_line


def make_pipeline(latent_dim=3, solver="euler", num_classes=None, seed=0):
    torch.manual_seed(seed)
    model = VRFMMLPModel(sample_size=2, latent_dim=latent_dim, hidden_dim=16, num_classes=num_classes)
    for parameter in model.parameters():  # no zero-initialised layer: make z matter
        torch.nn.init.normal_(parameter, std=0.3)
    encoder = VRFMPosteriorEncoder(sample_size=2, latent_dim=latent_dim, hidden_dim=16) if latent_dim else None
    return VRFMPipeline(velocity_model=model, scheduler=VRFMScheduler(solver=solver), posterior_encoder=encoder)


def test_call_signature_has_diffusers_parameters():
    parameters = inspect.signature(VRFMPipeline.__call__).parameters
    for name in ("batch_size", "num_inference_steps", "generator", "latents", "output_type", "return_dict", "z"):
        assert name in parameters


def test_generator_reproduces_exactly_and_returns_z():
    pipe = make_pipeline()
    a = pipe(batch_size=5, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    b = pipe(batch_size=5, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.samples, b.samples) and torch.equal(a.z, b.z)
    assert a.z.shape == (5, 3) and a.num_function_evals == 3
    c = pipe(batch_size=5, num_inference_steps=3, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a.samples, c.samples)


def test_batch_equals_items_run_one_by_one():
    pipe = make_pipeline()
    batch = pipe(batch_size=3, num_inference_steps=4, generator=[torch.Generator().manual_seed(i) for i in range(3)])
    for i in range(3):
        single = pipe(batch_size=1, num_inference_steps=4, generator=[torch.Generator().manual_seed(i)])
        torch.testing.assert_close(batch.samples[i : i + 1], single.samples, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(batch.z[i : i + 1], single.z)


def test_z_is_drawn_once_per_trajectory_and_time_advances():
    pipe = make_pipeline(solver="heun")
    seen = []
    original_forward = pipe.velocity_model.forward

    def spy(sample, timestep, z=None, class_labels=None, return_dict=True):
        seen.append((timestep.clone(), z.clone()))
        return original_forward(sample, timestep, z=z, class_labels=class_labels, return_dict=return_dict)

    pipe.velocity_model.forward = spy
    out = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert out.num_function_evals == len(seen) == 6
    assert all(torch.equal(z, out.z) for _, z in seen)
    times = [t[0].item() for t, _ in seen]
    assert times == pytest.approx([0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1.0], abs=1e-6)


def test_reencode_z_at_swaps_z_once_for_the_posterior_mean_of_the_predicted_end_point():
    pipe = make_pipeline()
    seen = []
    original_forward = pipe.velocity_model.forward

    def spy(sample, timestep, z=None, class_labels=None, return_dict=True):
        out = original_forward(sample, timestep, z=z, class_labels=class_labels, return_dict=return_dict)
        seen.append((sample.clone(), timestep[0].item(), z.clone(), out.sample.clone()))
        return out

    pipe.velocity_model.forward = spy
    plain = pipe(batch_size=3, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    seen.clear()
    out = pipe(batch_size=3, num_inference_steps=4, generator=torch.Generator().manual_seed(0), reencode_z_at=0.3)
    assert [t for _, t, _, _ in seen] == pytest.approx([0, 0.25, 0.5, 0.75])
    assert torch.equal(out.z, plain.z) and out.num_function_evals == 4  # the drawn z; no extra evaluation
    assert all(torch.equal(z, out.z) for _, _, z, _ in seen[:3])  # up to the first evaluation at t >= 0.3
    x_t, t, _, velocity = seen[2]
    x0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))  # the call's first draw is the source
    expected = pipe.posterior_encoder(x0=x0, x1=predicted_end_point(x_t, t, velocity), x_t=x_t, t=t).mean
    torch.testing.assert_close(seen[3][2], expected)
    assert not torch.allclose(out.samples, plain.samples)
    seen.clear()  # at or after the last evaluation's time it changes no velocity: the samples are the plain ones
    late = pipe(batch_size=3, num_inference_steps=4, generator=torch.Generator().manual_seed(0), reencode_z_at=0.75)
    assert torch.equal(late.samples, plain.samples)


def test_the_pipelines_reencode_z_at_is_its_calls_default_and_survives_saving(tmp_path):
    from diffusers import DiffusionPipeline

    plain = make_pipeline()
    pipe = VRFMPipeline(**plain.components, reencode_z_at=0.3)

    def sample(pipeline, **kwargs):
        return pipeline(batch_size=3, num_inference_steps=4, generator=torch.Generator().manual_seed(0), **kwargs)

    explicit = sample(plain, reencode_z_at=0.3).samples
    assert torch.equal(sample(pipe).samples, explicit) and not torch.equal(explicit, sample(plain).samples)
    assert torch.equal(sample(pipe, reencode_z_at=1).samples, sample(plain).samples)  # 1 turns it off
    assert torch.equal(sample(pipe, reencode_z_at=0.75).samples, sample(plain, reencode_z_at=0.75).samples)
    assert "reencode_z_at" not in pipe.components  # a setting, not a component, as diffusers sorts them
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["reencode_z_at"] == 0.3
    for loaded in (
        VRFMPipeline.from_pretrained(tmp_path),
        DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True),
    ):
        assert loaded.config.reencode_z_at == 0.3 and torch.equal(sample(loaded).samples, explicit)
    assert VRFMPipeline.from_pretrained(tmp_path, reencode_z_at=None).config.reencode_z_at is None
    plain.save_pretrained(tmp_path / "plain")  # a pipeline saved before the setting existed loads with it off
    index = json.loads((tmp_path / "plain" / "model_index.json").read_text())
    del index["reencode_z_at"]
    (tmp_path / "plain" / "model_index.json").write_text(json.dumps(index))
    assert VRFMPipeline.from_pretrained(tmp_path / "plain").config.reencode_z_at is None
    # an adaptive solver skips the saved default (an explicit one it refuses, as tested further down)
    pipe.scheduler = plain.scheduler = VRFMScheduler(solver="dopri5")
    assert torch.equal(sample(pipe).samples, sample(plain).samples)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"reencode_z_at": 1.5}, ValueError, r"`reencode_z_at` must lie in \[0.0, 1.0\], but got 1.5"),
        ({"reencode_z_at": True}, TypeError, "`reencode_z_at` must be a real number, but got bool True"),
        ({"reencode_z_at": 0.2, "posterior_encoder": None}, ValueError, "`reencode_z_at=0.2` re-encodes .* pass"),
    ],
)
def test_a_pipelines_reencode_z_at_is_checked_when_built(kwargs, error, match):
    with pytest.raises(error, match=match):
        VRFMPipeline(**{**make_pipeline().components, **kwargs})


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: make_pipeline(latent_dim=0), "no `z`"),
        (lambda: VRFMPipeline(velocity_model=make_pipeline().velocity_model, scheduler=VRFMScheduler()), "no `poster"),
        (lambda: make_pipeline(solver="dopri5"), "fixed-step scheduler; the adaptive solver 'dopri5'"),
    ],
)
def test_reencode_z_at_is_refused_where_it_cannot_work(make, match):
    with pytest.raises(ValueError, match=f"`reencode_z_at=0.5` .*{match}"):
        make()(batch_size=2, num_inference_steps=2, reencode_z_at=0.5)


def test_user_z_and_latents_are_honoured():
    pipe = make_pipeline()
    z, latents = torch.randn(4, 3), torch.randn(4, 2)
    out = pipe(batch_size=4, num_inference_steps=2, z=z, latents=latents)
    assert torch.equal(out.z, z)
    # integrating by hand with the same z and x0 gives the same result
    x = latents.clone()
    for t in (0.0, 0.5):
        x = x + 0.5 * pipe.velocity_model(x, torch.full((4,), t), z=z).sample
    torch.testing.assert_close(out.samples, x)
    one_z = pipe(batch_size=4, num_inference_steps=2, z=z[0], latents=latents)
    assert torch.equal(one_z.z, z[0].expand(4, 3))


def test_output_types_for_vectors():
    pipe = make_pipeline()
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    pt = pipe(batch_size=2, num_inference_steps=2, generator=generator()).samples
    as_np = pipe(batch_size=2, num_inference_steps=2, generator=generator(), output_type="np").samples
    latent = pipe(batch_size=2, num_inference_steps=2, generator=generator(), output_type="latent").samples
    assert isinstance(as_np, np.ndarray)
    np.testing.assert_allclose(as_np, pt.numpy())
    assert torch.equal(latent, pt)
    samples, z = pipe(batch_size=2, num_inference_steps=2, generator=generator(), return_dict=False)
    assert torch.equal(samples, pt) and z.shape == (2, 3)


def test_rectified_flow_pipeline_has_no_z():
    out = make_pipeline(latent_dim=0)(batch_size=3, num_inference_steps=2)
    assert out.z is None and out.samples.shape == (3, 2)


def test_adaptive_solver_is_selectable_and_reports_evaluations():
    pytest.importorskip("torchdiffeq")
    pipe = make_pipeline(solver="dopri5")
    reference = make_pipeline(solver="heun")
    with torch.no_grad():  # random sinusoidal time features oscillate fast in t; drop them so Heun resolves the field
        for model in (pipe.velocity_model, reference.velocity_model):
            model.t_embedding[0].weight.zero_()
    out = pipe(batch_size=4, generator=torch.Generator().manual_seed(0))
    assert out.num_function_evals > 6
    fine = reference(batch_size=4, num_inference_steps=100, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.samples, fine.samples, atol=1e-3, rtol=1e-3)


def test_classifier_free_guidance():
    pipe = make_pipeline(num_classes=3)
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    conditional = pipe(batch_size=2, num_inference_steps=2, class_labels=[1, 2], generator=generator())
    unguided = pipe(
        batch_size=2, num_inference_steps=2, class_labels=[1, 2], guidance_scale=1.0, generator=generator()
    )
    guided = pipe(batch_size=2, num_inference_steps=2, class_labels=[1, 2], guidance_scale=3.0, generator=generator())
    assert torch.equal(conditional.samples, unguided.samples)
    assert not torch.allclose(guided.samples, conditional.samples)
    assert guided.num_function_evals == 2


@pytest.mark.parametrize("scheduler", ["euler", "heun", "diffusers FlowMatchEuler", "euler, z re-encoded"])
def test_a_sampling_step_makes_the_host_wait_for_nothing(scheduler, monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = make_pipeline(num_classes=3, solver="heun" if scheduler == "heun" else "euler")
    if scheduler.startswith("diffusers"):
        pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    pipe.set_progress_bar_config(disable=True)
    waits = []
    count_host_reads(monkeypatch, waits)  # what reads host memory without an operator
    per_call = {}
    for steps in (2, 8):
        waits.clear()
        with DeviceWaits(waits, {"on": True}):
            reencode = {"reencode_z_at": 0.3} if scheduler.endswith("re-encoded") else {}
            pipe(batch_size=3, num_inference_steps=steps, class_labels=[0, 1, 2], guidance_scale=2.0, **reencode)
        per_call[steps] = collections.Counter(waits)
    # A few per call (the grid's checks, the labels' range, the end point's finiteness), none per step: on a GPU the
    # sampling loop queues its steps without waiting for them.
    assert per_call[2] == per_call[8], per_call
    assert 0 < sum(per_call[8].values()) < 10, "the counter sees the per-call checks, and only those"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_inference_steps": 0}, ValueError, "`num_inference_steps`"),
        ({"num_inference_steps": 2.0}, TypeError, "`num_inference_steps`"),
        ({"output_type": "jpg"}, ValueError, "`output_type`"),
        ({"output_type": "pil"}, ValueError, "`output_type='pil'`"),
        ({"z": torch.randn(4, 5)}, ValueError, "`z` must have shape"),
        ({"z": torch.full((4, 3), float("nan"))}, ValueError, "`z` must be a finite"),
        ({"latents": torch.randn(4, 3)}, ValueError, "`latents` must have shape"),
        ({"batch_size": 0}, ValueError, "`batch_size`"),
        ({"generator": [torch.Generator()]}, ValueError, "`generator`"),
        ({"generator": 3}, TypeError, "`generator`"),
        ({"class_labels": [0, 1, 0, 1]}, ValueError, "`class_labels`"),
        ({"timesteps": [0.0, 0.6, 0.3], "num_inference_steps": None}, ValueError, "strictly increasing"),
        ({"timesteps": [0.0, 0.5]}, ValueError, "either `num_inference_steps` \\(2\\) or `timesteps`, not both"),
        ({"guidance_scale": float("inf")}, ValueError, "`guidance_scale`"),
        ({"class_labels": [0, 1, 0, 1], "guidance_scale": 10**400}, ValueError, "`guidance_scale` must be finite"),
        ({"callback_on_step_end": 3}, TypeError, "`callback_on_step_end` must be callable"),
        ({"callback_on_step_end_tensor_inputs": ["z"], "callback_on_step_end": print}, ValueError, "among"),
        ({"reencode_z_at": 1.5}, ValueError, "`reencode_z_at` must lie in \\[0.0, 1.0\\], but got 1.5"),
        ({"reencode_z_at": "0.5"}, TypeError, "`reencode_z_at` must be a real number"),
    ],
)
def test_bad_call_arguments_are_refused(kwargs, error, match):
    arguments = {"batch_size": 4, "num_inference_steps": 2, **kwargs}
    with pytest.raises(error, match=match):
        make_pipeline()(**arguments)


def test_constructor_refuses_mismatched_components():
    with pytest.raises(ValueError, match="latent_dim"):
        VRFMPipeline(VRFMMLPModel(latent_dim=3), VRFMScheduler(), VRFMPosteriorEncoder(latent_dim=2))
    with pytest.raises(TypeError, match="`scheduler` must be a scheduler that integrates a flow ODE.*VRFMScheduler"):
        from diffusers import DDPMScheduler

        VRFMPipeline(VRFMMLPModel(), DDPMScheduler())


def test_custom_timesteps_in_pipeline():
    pipe = make_pipeline()
    out = pipe(batch_size=2, timesteps=[0.0, 0.2, 0.9], generator=torch.Generator().manual_seed(0))
    assert out.num_function_evals == 3
    torch.testing.assert_close(pipe.scheduler.time_grid, torch.tensor([0.0, 0.2, 0.9, 1.0]))


def test_interpolate_z():
    a, b = torch.randn(3), torch.randn(3)
    path = VRFMPipeline.interpolate_z(a, b, num_points=5)
    assert path.shape == (5, 3)
    torch.testing.assert_close(path[0], a)
    out = make_pipeline()(batch_size=5, num_inference_steps=2, z=path, latents=torch.zeros(1, 2).expand(5, 2))
    assert out.samples.shape == (5, 2)


# ------------------------------------------------------------------------------------------------- saving and loading
def test_saved_folder_layout_and_remote_code_files(tmp_path):
    pipe = make_pipeline()
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "VRFMPipeline"]
    assert index["vae"] == [None, None]
    python_files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.py"))
    assert python_files == [
        "pipeline.py",
        "posterior_encoder/vrfmposteriorencoder.py",
        "scheduler/vrfmscheduler.py",
        "velocity_model/vrfmmlpmodel.py",
    ]
    for path in tmp_path.rglob("*.py"):  # each is exactly one import line from the installed package
        lines = path.read_text().splitlines()
        assert len(lines) == 1 and lines[0].startswith("from diffusers_vrfm import ")
    assert (tmp_path / "pipeline.py").read_text() == remote_code_line("VRFMPipeline")
    assert not list(tmp_path.rglob("*.bin")) and len(list(tmp_path.rglob("*.safetensors"))) == 2


def test_optional_components_stay_none_after_reload(tmp_path):
    pipe = make_pipeline(latent_dim=0)
    pipe.save_pretrained(tmp_path)
    reloaded = VRFMPipeline.from_pretrained(tmp_path)
    assert reloaded.posterior_encoder is None and reloaded.vae is None and reloaded.prior is None
    assert set(reloaded.components) == {"velocity_model", "scheduler", "posterior_encoder", "vae", "prior"}


def test_from_pretrained_accepts_component_overrides(tmp_path):
    make_pipeline().save_pretrained(tmp_path)
    reloaded = VRFMPipeline.from_pretrained(tmp_path, scheduler=VRFMScheduler(solver="heun"))
    assert reloaded.scheduler.config.solver == "heun"
    with pytest.raises(TypeError, match="unexpected arguments"):
        VRFMPipeline.from_pretrained(tmp_path, unet=None)


LOAD_SCRIPT = """
import sys, torch
from diffusers import DiffusionPipeline
route, folder, out, threads = sys.argv[1:]
torch.set_num_threads(int(threads))  # bit-identical results need the same reduction order as the parent process
if route == "remote":
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
else:
    from diffusers_vrfm import VRFMPipeline
    pipe = VRFMPipeline.from_pretrained(folder)
pipe.set_progress_bar_config(disable=True)
result = pipe(batch_size=6, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
torch.save({"samples": result.samples, "z": result.z, "class": type(pipe).__name__}, out)
"""


@pytest.mark.parametrize("route", ["package", "remote"])
def test_both_load_routes_work_offline_in_a_fresh_process(tmp_path, route):
    pipe = make_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    expected = pipe(batch_size=6, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_SCRIPT,
            route,
            str(tmp_path / "pipe"),
            str(tmp_path / "out.pt"),
            str(torch.get_num_threads()),
        ],
        check=True,
        env=environment,
    )
    loaded = torch.load(tmp_path / "out.pt")
    assert loaded["class"] == "VRFMPipeline"
    assert torch.equal(loaded["samples"], expected.samples) and torch.equal(loaded["z"], expected.z)


def test_remote_route_needs_trust_remote_code(tmp_path):
    from diffusers import DiffusionPipeline

    make_pipeline().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(tmp_path)


def test_push_to_hub_uploads_exactly_the_saved_layout(tmp_path, monkeypatch):
    import huggingface_hub

    recorded = {}

    class RepoUrl(str):
        repo_id = "user/tiny-vrfm"

    def fake_create_repo(repo_id, **kwargs):
        recorded["repo"] = repo_id
        return RepoUrl("https://example.invalid/user/tiny-vrfm")

    def fake_upload_folder(repo_id, folder_path, ignore_patterns=(), **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        files = [
            os.path.relpath(os.path.join(root, name), folder_path)
            for root, _, names in os.walk(folder_path)
            for name in names
        ]
        recorded["files"] = sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        recorded["upload_repo"] = repo_id

    monkeypatch.setattr(huggingface_hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    pipe = make_pipeline()
    pipe.save_pretrained(tmp_path / "tiny-vrfm", push_to_hub=True, repo_id="user/tiny-vrfm")
    saved = sorted(
        os.path.relpath(os.path.join(root, name), tmp_path / "tiny-vrfm")
        for root, _, names in os.walk(tmp_path / "tiny-vrfm")
        for name in names
    )
    assert recorded["repo"] == recorded["upload_repo"] == "user/tiny-vrfm"
    assert recorded["files"] == saved
    assert "model_index.json" in saved and "pipeline.py" in saved


def test_tampered_model_index_is_refused(tmp_path):
    make_pipeline().save_pretrained(tmp_path)
    index_path = tmp_path / "model_index.json"
    index = json.loads(index_path.read_text())
    index["velocity_model"] = ["os", "system"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="does not load"):
        VRFMPipeline.from_pretrained(tmp_path)
    index["velocity_model"] = ["evil_module", "VRFMMLPModel"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="evil_module"):
        VRFMPipeline.from_pretrained(tmp_path)


def test_pickle_weights_are_refused_unless_opted_in(tmp_path):
    pipe = make_pipeline()
    pipe.save_pretrained(tmp_path)
    folder = tmp_path / "velocity_model"
    weights = pipe.velocity_model.state_dict()
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(weights, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle"):
        VRFMPipeline.from_pretrained(tmp_path)
    reloaded = VRFMPipeline.from_pretrained(tmp_path, allow_pickle=True)
    assert torch.equal(reloaded.velocity_model.x_embedding.weight, pipe.velocity_model.x_embedding.weight)


def test_unsafe_serialization_writes_pickle_that_loads_only_with_the_opt_in(tmp_path):
    pipe = make_pipeline()
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    assert os.path.isfile(tmp_path / "velocity_model" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        VRFMPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        VRFMPipeline.from_pretrained(tmp_path, use_safetensors=False)
    reloaded = VRFMPipeline.from_pretrained(tmp_path, allow_pickle=True)
    for name, tensor in pipe.velocity_model.state_dict().items():
        assert torch.equal(tensor, reloaded.velocity_model.state_dict()[name])


def test_to_dtype_runs_in_bfloat16():
    pipe = make_pipeline().to(torch.bfloat16)
    out = pipe(batch_size=3, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.samples.dtype == torch.bfloat16 and torch.isfinite(out.samples.float()).all()


def test_learned_conditional_prior_component(tmp_path):
    pipe = make_pipeline()
    prior = VRFMPosteriorEncoder(sample_size=2, latent_dim=3, hidden_dim=16, posterior_inputs=("x0",))
    with torch.no_grad():
        prior.to_mean.bias.fill_(5.0)
        prior.to_logvar.bias.fill_(-20.0)
    pipe = VRFMPipeline(pipe.velocity_model, pipe.scheduler, pipe.posterior_encoder, prior=prior)
    latents = torch.randn(4, 2)
    out = pipe(batch_size=4, num_inference_steps=2, latents=latents, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.z, prior(x0=latents).mean, atol=1e-3, rtol=0)  # z comes from p(z | x0)
    assert (out.z - 5.0).abs().max() < 1.0
    pipe.save_pretrained(tmp_path)
    reloaded = VRFMPipeline.from_pretrained(tmp_path)
    assert tuple(reloaded.prior.config.posterior_inputs) == ("x0",)
    again = reloaded(batch_size=4, num_inference_steps=2, latents=latents, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.samples, out.samples)
    with pytest.raises(ValueError, match="`prior`"):
        VRFMPipeline(pipe.velocity_model, pipe.scheduler, prior=VRFMPosteriorEncoder(sample_size=2, latent_dim=3))
