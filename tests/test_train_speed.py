"""Issue 12: the training step's randomness is drawn per purpose for the whole global batch (no per-example
generators), nothing in the steps between metric reads would make the host wait for a GPU, and the speed options
parse and run."""

import collections
import json
import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from device_waits import DeviceWaits, count_host_reads
from train_helpers import (
    FAST,
    TINY_POSTERIOR,
    TINY_UNET,
    assert_same_tensors,
    count_forward_calls,
    reset_accelerate,
    train_runner,
)

from diffusers_vrfm import VRFMScheduler
from diffusers_vrfm.training import data as training_data
from diffusers_vrfm.training import loop as training_loop
from diffusers_vrfm.training import step as training_step
from diffusers_vrfm.training.step import draw_step_randomness


@pytest.fixture
def train():
    yield from train_runner()


class _CountingGenerator(torch.Generator):
    """A `torch.Generator` that counts its instances while `counting` is on (the base class is built in `__new__`)."""

    counting = False
    created = 0

    def __init__(self, *args, **kwargs):
        if _CountingGenerator.counting:
            _CountingGenerator.created += 1


def _count_generators_in(function):
    def counted(*args, **kwargs):
        _CountingGenerator.counting = True
        try:
            return function(*args, **kwargs)
        finally:
            _CountingGenerator.counting = False

    return counted


def test_step_randomness_makes_one_generator_per_purpose(monkeypatch):
    monkeypatch.setattr(torch, "Generator", _CountingGenerator)
    monkeypatch.setattr(_CountingGenerator, "created", 0)
    with monkeypatch.context() as patch:
        patch.setattr(_CountingGenerator, "counting", True)
        out = draw_step_randomness(
            VRFMScheduler(), 0, 5, 64, slice(0, 64), (3,), 0.2, 10, 0.1, 4, prior_mix=0.5, learned_prior=True
        )
    # times, noise, label dropout, caption dropout, posterior, prior: six generators for 64 examples
    assert _CountingGenerator.created == 6
    assert out.posterior_noise.shape == out.prior_noise.shape == (64, 4) and out.prior_mask.shape == (64,)


def _run_and_count(train, monkeypatch, tmp_path, batch_size, kind):
    monkeypatch.setattr(torch, "Generator", _CountingGenerator)
    monkeypatch.setattr(_CountingGenerator, "created", 0)
    for name in ("draw_micro_batch", "accumulate_micro_step"):  # the data loader's items are made in the first
        monkeypatch.setattr(training_loop, name, _count_generators_in(getattr(training_loop, name)))
    if kind == "image":  # label dropout and the prior mix
        argv = ["--resolution", "8", "--model_config", TINY_UNET, "--posterior_config", TINY_POSTERIOR,
                "--latent_dim", "3", "--prior_mix", "0.5", "--label_dropout", "0.1"]  # fmt: skip
    else:  # captioned digits through a data loader, an MMDiT from scratch, caption dropout; one epoch (an order each)
        tiny_mmdit = json.dumps({"num_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2})
        argv = ["--backbone", "sd3", "--model_config", tiny_mmdit, "--max_train_samples", "64",
                "--caption_dropout", "0.5", "--aggregate_prior_atoms", "8"]  # fmt: skip
    argv += [
        "--output_dir", tmp_path / f"run{batch_size}", "--train_batch_size", batch_size, "--max_train_steps", "2",
        "--gradient_accumulation_steps", "2", "--num_validation_samples", "2", "--validation_steps", "100", *FAST,
    ]  # fmt: skip
    summary = train([str(a) for a in argv])
    assert summary["global_step"] == 2
    return _CountingGenerator.created


@pytest.mark.parametrize("kind", ["image", "text_to_image"])
def test_a_training_step_creates_no_per_example_generator(train, monkeypatch, tmp_path, kind):
    small = _run_and_count(train, monkeypatch, tmp_path, 2, kind)
    large = _run_and_count(train, monkeypatch, tmp_path, 8, kind)
    assert small > 0, "the patch sees the generators of the step"
    assert large == small, f"the generators of a step grow with the batch: {small} for 2 examples, {large} for 8"
    assert large <= 4 * 6, "at most one generator per purpose and micro-step (4 micro-steps)"


# ------------------------------------------------------------------------------------------------ speed options
def _tiny_image_run(tmp_path, *extra):
    return [
        "--output_dir", tmp_path, "--resolution", "8", "--model_config", TINY_UNET, "--posterior_config",
        TINY_POSTERIOR, "--latent_dim", "3", "--train_batch_size", "4", "--max_train_steps", "2",
        "--checkpointing_steps", "2", "--num_validation_samples", "2", *FAST, *extra,
    ]  # fmt: skip


def test_speed_options_parse_and_validate():
    from diffusers_vrfm.training.cli import parse_args

    args = parse_args(["--torch_compile", "--channels_last", "--allow_tf32"])
    assert args.torch_compile and args.channels_last and args.allow_tf32
    defaults = parse_args([])
    assert not (defaults.torch_compile or defaults.channels_last or defaults.allow_tf32)
    with pytest.raises(ValueError, match=r"`--channels_last` must be off with --backbone mlp .*, but got True"):
        parse_args(["--backbone", "mlp", "--channels_last"])
    assert defaults.torch_compile_mode is None
    assert parse_args(["--torch_compile", "--torch_compile_mode", "reduce-overhead"]).torch_compile_mode == (
        "reduce-overhead"
    )
    with pytest.raises(ValueError, match=r"`--torch_compile_mode` must be given only with --torch_compile, but got"):
        parse_args(["--torch_compile_mode", "reduce-overhead"])
    with pytest.raises(SystemExit):  # argparse names the choices
        parse_args(["--torch_compile", "--torch_compile_mode", "fast"])
    accumulating = ["--torch_compile", "--gradient_accumulation_steps", "2", "--torch_compile_mode"]
    with pytest.raises(ValueError, match=r"`--torch_compile_mode` must be one without CUDA graphs .* but got 'max-au"):
        parse_args([*accumulating, "max-autotune"])
    assert parse_args([*accumulating, "max-autotune-no-cudagraphs"]).gradient_accumulation_steps == 2


class _CountedCalls:
    """Stands for `torch.compile(function)`: runs `function` eagerly and counts the calls."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


def test_torch_compile_compiles_the_steps_loss_and_marks_each_micro_step(train, monkeypatch, tmp_path):
    compiled, step_marks, betas = [], [], []

    def record_compile(function, **options):
        compiled.append((function.__name__, options, _CountedCalls(function)))
        return compiled[-1][-1]

    def record_beta(*args, beta, **kwargs):
        betas.append(beta)
        return loss_function(*args, beta=beta, **kwargs)

    loss_function = training_step.vrfm_training_loss

    monkeypatch.setattr(torch, "compile", record_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: step_marks.append(1))
    monkeypatch.setattr(training_step, "vrfm_training_loss", record_beta)
    argv = _tiny_image_run(tmp_path / "run", "--torch_compile", "--torch_compile_mode", "max-autotune-no-cudagraphs")
    warmup = ["--kl_target", "off", "--beta", "1", "--beta_warmup_steps", "2"]  # a float beta, a value per update
    summary = train([*argv, "--learned_prior", "--gradient_accumulation_steps", "2", *warmup])
    assert summary["finished"]
    assert [(name, options) for name, options, _ in compiled] == [
        ("record_beta", {"mode": "max-autotune-no-cudagraphs"})
    ], "one compile: the loss function, with the posterior, the learned prior and the velocity model inside"
    assert compiled[0][-1].calls == 4, "the step's calls, and no others (validation calls the models)"
    assert len(step_marks) == 4, "one mark per micro-step: 2 updates x 2 micro-steps"
    assert all(isinstance(beta, torch.Tensor) and beta.ndim == 0 for beta in betas), "a graph input, not a constant"
    assert [beta.item() for beta in betas] == pytest.approx([0.0, 0.0, 0.5, 0.5]), "the warm-up's values"


@pytest.mark.parametrize(
    ("backbone", "shape", "config"),
    [
        ("unet", (1, 8, 8), json.loads(TINY_UNET)),
        ("dit", (1, 8, 8), {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 2}),
        ("mlp", (2,), {}),
    ],
)
def test_the_steps_loss_compiles_to_one_graph(backbone, shape, config):
    """A graph break splits the compiled step (and its CUDA graphs) in two: none in the loss function `--torch_compile`
    compiles, with the posterior, a learned prior and prior draws mixed in (VRFM, plain and prepared by accelerate for
    bf16), or with none of them (RF)."""
    from diffusers_vrfm.models.z_embedding import skip_value_checks
    from diffusers_vrfm.training.factory import build_models

    vrfm = build_models(backbone, shape, 3, ("x0", "x1", "x_t", "t"), model_config=config)
    rf = build_models(backbone, shape, 0, (), model_config=config)
    posterior_config = {k: v for k, v in vrfm.posterior_encoder.config.items() if not k.startswith("_")}
    prior = type(vrfm.posterior_encoder).from_config({**posterior_config, "posterior_inputs": ["x0"]})
    x0, x1, t, noise = torch.randn(4, *shape), torch.randn(4, *shape), torch.rand(4), torch.randn(4, 3)
    mask = torch.tensor([True, False, True, False])
    vrfm_inputs = {"posterior_noise": noise, "prior_encoder": prior, "prior_noise": noise, "prior_mask": mask}
    loss = torch._dynamo.explain(training_step.vrfm_training_loss)
    with skip_value_checks():
        explained = [
            loss(vrfm.velocity_model, vrfm.posterior_encoder, x0, x1, t, beta=torch.tensor(0.5), **vrfm_inputs),
            loss(rf.velocity_model, None, x0, x1, t, beta=torch.tensor(0.5)),
        ]
        reset_accelerate()  # as the script runs them: wrapped by accelerate for bf16 autocast
        try:
            velocity, posterior, prior = Accelerator(cpu=True, mixed_precision="bf16").prepare(
                vrfm.velocity_model, vrfm.posterior_encoder, prior
            )
            inputs = {**vrfm_inputs, "prior_encoder": prior}
            explained.append(loss(velocity, posterior, x0, x1, t, beta=torch.tensor(0.5), **inputs))
        finally:
            reset_accelerate()
    for one in explained:
        assert (one.graph_count, one.graph_break_count) == (1, 0), one.break_reasons


def _tiny_text_to_image_backbones(latent_dim: int) -> tuple:
    """A `VRFMUNet2DConditionModel` (context width 16) and a `VRFMSD3Transformer2DModel` (context width 16, pooled
    width 8), both on 4-channel 8x8 samples."""
    from diffusers_vrfm import VRFMSD3Transformer2DModel, VRFMUNet2DConditionModel

    unet = VRFMUNet2DConditionModel(
        sample_size=8, latent_dim=latent_dim, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
        cross_attention_dim=16, attention_head_dim=4,
    )  # fmt: skip
    sd3 = VRFMSD3Transformer2DModel(
        sample_size=8, in_channels=4, out_channels=4, latent_dim=latent_dim, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        pos_embed_max_size=8,
    )  # fmt: skip
    return unet, sd3


def test_the_text_to_image_backbones_compile_to_one_graph_each():
    from diffusers_vrfm.models.z_embedding import skip_value_checks

    unet, sd3 = _tiny_text_to_image_backbones(latent_dim=4)
    x, t, z, context = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 4), torch.randn(2, 5, 16)
    with skip_value_checks():
        explained = [
            torch._dynamo.explain(unet)(x, t, z=z, encoder_hidden_states=context),
            torch._dynamo.explain(sd3)(x, t, z=z, encoder_hidden_states=context, pooled_projections=torch.randn(2, 8)),
        ]
    for one in explained:
        assert (one.graph_count, one.graph_break_count) == (1, 0), one.break_reasons


def test_a_forward_looks_up_its_models_dtype_and_device_once(monkeypatch):
    """diffusers' `ModelMixin.dtype` and `.device` walk every submodule (for offloading and casting hooks): about
    0.5 ms each for issue 12's UNet on a CPU, host time that a small model's GPU step waits for. Each wrapper asks once
    and takes them from the moved sample after that."""
    from diffusers.models import modeling_utils

    from diffusers_vrfm.training.factory import build_models

    lookups = collections.Counter()

    def counted(name):
        original = getattr(modeling_utils, name)

        def lookup(module):
            lookups[type(module).__name__, name] += 1
            return original(module)

        monkeypatch.setattr(modeling_utils, name, lookup)

    counted("get_parameter_dtype")
    counted("get_parameter_device")
    x, t, z = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 3)
    unet = build_models("unet", (4, 8, 8), 3, ("x1",), model_config=json.loads(TINY_UNET)).velocity_model
    dit_config = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 2}
    dit = build_models("dit", (4, 8, 8), 3, ("x1",), model_config=dit_config).velocity_model
    condition_unet, sd3 = _tiny_text_to_image_backbones(latent_dim=3)
    for model in (unet, dit, condition_unet, sd3):
        lookups.clear()
        model(x, t, z=z)
        wrapper = type(model).__name__
        assert lookups[wrapper, "get_parameter_dtype"] == lookups[wrapper, "get_parameter_device"] == 1, lookups


def test_channels_last_and_tf32_run_and_keep_the_saved_weights_plain(train, tmp_path):
    from safetensors.torch import load_file

    # torch's backend flags are properties of module objects, which monkeypatch cannot always restore: do it by hand
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        summary = train(_tiny_image_run(tmp_path / "run", "--channels_last", "--allow_tf32"))
        assert summary["finished"] and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    weights = load_file(str(tmp_path / "run" / "velocity_model" / "diffusion_pytorch_model.safetensors"))
    assert not any(name.startswith("_orig_mod") for name in weights)


def test_gradient_checkpointing_recomputes_the_blocks_and_trains_the_same_weights(train, tmp_path, monkeypatch):
    from diffusers.models.resnet import ResnetBlock2D
    from safetensors.torch import load_file

    calls = count_forward_calls(monkeypatch, ResnetBlock2D)
    runs = {}
    for name, extra in (("plain", []), ("checkpointed", ["--gradient_checkpointing"])):
        calls["count"] = 0
        assert train(_tiny_image_run(tmp_path / name, "--validation_steps", "100", *extra))["finished"]
        weights = load_file(str(tmp_path / name / "velocity_model" / "diffusion_pytorch_model.safetensors"))
        runs[name] = (calls["count"], weights)
    (plain_calls, plain), (checkpointed_calls, checkpointed) = runs["plain"], runs["checkpointed"]
    assert checkpointed_calls > plain_calls, "the backward passes run the UNet's residual blocks again"
    assert_same_tensors(checkpointed, plain)
    toy = ["--output_dir", tmp_path / "toy", "--backbone", "mlp", "--dataset_name", "toy:ring_2d", "--max_train_steps"]
    with pytest.raises(ValueError, match="`--gradient_checkpointing` needs a velocity model with blocks to recompute"):
        train([*toy, "2", *FAST, "--gradient_checkpointing"])


def test_peak_gpu_memory_is_reported_for_cuda_devices_only(monkeypatch):
    from diffusers_vrfm.training.finish import peak_gpu_memory_mib

    assert peak_gpu_memory_mib("cpu") is None and peak_gpu_memory_mib(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**20 + 2**19)
    assert peak_gpu_memory_mib("cuda:0") == 3.5


@pytest.mark.slow  # inductor compiles C++ kernels on the CPU: about a minute on a small machine
def test_torch_compile_runs_on_cpu_and_saves_plain_weights(train, tmp_path):
    from safetensors.torch import load_file

    summary = train(_tiny_image_run(tmp_path / "run", "--torch_compile", "--torch_compile_mode", "reduce-overhead"))
    assert summary["finished"]
    weights = load_file(str(tmp_path / "run" / "velocity_model" / "diffusion_pytorch_model.safetensors"))
    assert not any(name.startswith("_orig_mod") for name in weights)


# ------------------------------------------------------------------------------------ no device waits per step
def _count_device_waits(monkeypatch):
    """Counts what would make the host wait for the device inside the training loop, outside its metric reads and
    checkpoints: the operators of `waits_on_cuda` and the tensors read to host memory."""
    waits = []
    active = {"on": False}
    count_host_reads(monkeypatch, waits, active)

    def switch(function, on):
        def switched(*args, **kwargs):
            previous, active["on"] = active["on"], on
            try:
                return function(*args, **kwargs)
            finally:
                active["on"] = previous

        return switched

    def watched_loop(*args, _loop=switch(training_loop.train_loop, True), **kwargs):
        with DeviceWaits(waits, active):
            return _loop(*args, **kwargs)

    monkeypatch.setattr(training_loop, "train_loop", watched_loop)
    # the metric reads and checkpoints may read; so may the data's one-time preparation and a data loader's fetches
    # (host work by design, in worker processes with --dataloader_num_workers; its batches come in pinned memory)
    for name in ("read_pending_updates", "save_loop_checkpoint", "make_data_iterator"):
        monkeypatch.setattr(training_loop, name, switch(getattr(training_loop, name), False))
    loader_iterator = torch.utils.data.dataloader._BaseDataLoaderIter
    monkeypatch.setattr(loader_iterator, "__next__", switch(loader_iterator.__next__, False))
    return waits


def test_the_wait_counter_sees_reads_host_data_and_shapes_read_from_values(monkeypatch):
    def stand_in_loop():
        x = torch.full((4,), 2.0) * 3  # made where it is used: no wait
        torch.tensor([1.0, 2.0]), torch.from_numpy(np.ones(2))
        x[x > 0], torch.where(x > 0, x, 0), x.masked_fill(x > 0, 0)  # only the first reads its shape from values
        training_loop.read_pending_updates()  # a metric read: allowed
        torch.allclose(x, x + 1e-9)  # its bool is made inside the operator
        return x.sum().item(), bool(x.any()), x.tolist(), x.cpu()

    monkeypatch.setattr(training_loop, "train_loop", stand_in_loop)
    monkeypatch.setattr(training_loop, "read_pending_updates", lambda: torch.tensor(1.0).item())
    waits = _count_device_waits(monkeypatch)
    training_loop.train_loop()
    assert collections.Counter(waits) == {
        "tensor made from host data": 2,
        "output shape read from the values": 1,
        "read of a value": 3,
        "read of a tensor (tolist)": 1,
        "read of a tensor (cpu)": 1,
    }


def test_host_tensors_go_to_a_cuda_device_through_pinned_memory_without_waiting(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin_memory") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kwargs: calls.append((args, kwargs)) or self)
    training_data.host_to_device(torch.ones(2), torch.device("cuda"))
    assert calls == ["pin_memory", ((torch.device("cuda"),), {"non_blocking": True})]
    calls.clear()
    training_data.host_to_device(torch.ones(2), "cpu")
    assert calls == [(("cpu",), {})]


@pytest.mark.parametrize("kind", ["image", "text_to_image", "vector"])
def test_training_steps_wait_for_nothing_between_metric_reads(train, monkeypatch, tmp_path, kind):
    waits = _count_device_waits(monkeypatch)
    common = ["--max_train_steps", "6", "--logging_steps", "3", "--gradient_accumulation_steps", "2"]
    if kind == "image":  # label dropout, the prior mix and an adapted beta: every purpose of the step
        argv = _tiny_image_run(tmp_path / "run", "--prior_mix", "0.5", "--label_dropout", "0.1", *common)
    elif kind == "text_to_image":  # captioned digits through a data loader, an MMDiT from scratch, caption dropout
        tiny_mmdit = json.dumps({"num_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2})
        argv = ["--output_dir", tmp_path / "run", "--backbone", "sd3", "--model_config", tiny_mmdit,
                "--max_train_samples", "16", "--train_batch_size", "4", "--caption_dropout", "0.2",
                "--num_validation_samples", "2", "--aggregate_prior_atoms", "8", *FAST, *common]  # fmt: skip
    else:
        argv = ["--output_dir", tmp_path / "run", "--backbone", "mlp", "--num_validation_samples", "8", *FAST, *common]
    argv += ["--nonfinite_policy", "skip"]
    summary = train([str(a) for a in argv])
    assert summary["global_step"] == 6
    assert waits == [], f"the training steps wait for the device: {collections.Counter(waits)}"
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "logs" / "metrics.jsonl")]
    assert [record["step"] for record in metrics] == [1, 2, 3, 4, 5, 6], "one record per step, read every 3"
    assert all(math.isfinite(record["loss"]) and record["beta"] > 0 for record in metrics)


def _adamw(fused):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 3))
    return weight, torch.optim.AdamW([weight], lr=0.1, weight_decay=0.01, fused=fused)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-on-device", "other-reads-once"])
def test_a_skipped_update_leaves_weights_and_optimizer_state_unchanged(fused):
    from diffusers_vrfm.training.step import optimizer_step_unless

    weight, optimizer = _adamw(fused)
    weight.grad = torch.ones_like(weight)
    optimizer_step_unless(optimizer, torch.tensor(False))  # a real update first, so that the state is not empty
    before = weight.detach().clone(), {k: v.clone() for k, v in optimizer.state[weight].items()}
    weight.grad = torch.full_like(weight, float("nan"))
    optimizer_step_unless(optimizer, torch.tensor(True))
    assert torch.equal(weight.detach(), before[0])
    assert all(torch.equal(optimizer.state[weight][k], v) for k, v in before[1].items())
    assert not hasattr(optimizer, "found_inf"), "the flag does not outlive the step"
    weight.grad = torch.ones_like(weight)
    optimizer_step_unless(optimizer, torch.tensor(False))
    assert not torch.equal(weight.detach(), before[0]) and float(optimizer.state[weight]["step"]) == 2


def test_the_fused_skip_matches_an_unskipped_history():
    """A run with a skipped update in the middle ends where the same run without that update ends."""
    from diffusers_vrfm.training.step import optimizer_step_unless

    gradients = [torch.randn(4, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    skipping, optimizer = _adamw(True)
    for index, gradient in enumerate([gradients[0], torch.full((4, 3), float("inf")), *gradients[1:]]):
        skipping.grad = gradient
        optimizer_step_unless(optimizer, torch.tensor(index == 1))
    clean, reference = _adamw(True)
    for gradient in gradients:
        clean.grad = gradient
        reference.step()
    assert torch.equal(skipping.detach(), clean.detach())
