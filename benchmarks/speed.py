"""Speed and overhead: what VRFM costs over plain rectified flow, measured side by side in one run.

Training: one optimiser step (forward, loss, backward, Adam) of VRFM (velocity net with a ``z`` path plus the
convolutional posterior, `vrfm_loss` with its KL) against RF (the same wrapper with `latent_dim=0`, no posterior), on
the same `VRFMUNet2DModel` and `VRFMDiTTransformer2DModel` backbones. VRFM's nets have the `z` map that
`train_vrfm.py` gives its from-scratch image models (`--z-map-channels`, default 4; 0: the `z` MLP alone).

Sampling: time per Euler step of

- `VRFMPipeline` with the VRFM model and `VRFMScheduler` (what a user of this package runs);
- `VRFMPipeline` with the RF wrapper (`latent_dim=0`);
- diffusers' `FlowMatchEulerDiscreteScheduler` driving the RF wrapper, with the clock and sign converted by the
  converters of `diffusers_vrfm.objective` (``sigma = 1 - t``, model output ``-v``);
- diffusers' `FlowMatchEulerDiscreteScheduler` driving the bare inner backbone (`UNet2DModel` /
  `DiTTransformer2DModel`): a stock diffusers flow-matching loop, the baseline of the sampling target.

The variants are interleaved round by round (`benchmarks.common.interleaved_timings`) so that machine noise hits them
alike, and the reported ratios are medians of per-round ratios. The run also checks that the diffusers loop and
`VRFMPipeline` produce the same samples from the RF wrapper on the same uniform grid (the converters are right).

Run from the repository root::

    python -m benchmarks.speed            # the full run
    python -m benchmarks.speed --quick    # a smoke run in a few seconds
    python -m benchmarks.speed --device cuda --dtype bfloat16 --output-dir benchmarks/results/gpu  # on a GPU
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as `python benchmarks/speed.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    count_parameters,
    interleaved_timings,
    machine_description,
    markdown_table,
    median_ratio,
    pyplot,
    resolve_device,
    torch_threads,
    write_json,
)
from diffusers_vrfm import (  # noqa: E402
    VRFMConvPosteriorEncoder,
    VRFMDiTTransformer2DModel,
    VRFMPipeline,
    VRFMScheduler,
    VRFMUNet2DModel,
    flow_match_output_to_velocity,
    interpolate,
    sigma_to_t,
    target_velocity,
    velocity_to_flow_match_output,
    vrfm_loss,
)

TRAIN_TARGET = 1.15
SAMPLE_TARGET = 1.02
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def backbone_configs(quick: bool) -> dict[str, dict]:
    """The two backbones: a small CIFAR-shaped UNet and a small latent-shaped DiT (tinier with `quick`)."""
    if quick:
        unet = dict(
            sample_size=16,
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            norm_num_groups=8,
        )
        dit = dict(sample_size=8, in_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=16)
        posterior = dict(block_out_channels=(8, 16), norm_num_groups=4, hidden_dim=32)
    else:
        unet = dict(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            norm_num_groups=8,
        )
        dit = dict(sample_size=16, in_channels=4, num_layers=4, num_attention_heads=4, attention_head_dim=32)
        posterior = dict(block_out_channels=(16, 32, 64), norm_num_groups=8, hidden_dim=128)
    return {
        "UNet": {"cls": VRFMUNet2DModel, "kwargs": unet, "posterior": posterior, "inner": "unet"},
        "DiT": {"cls": VRFMDiTTransformer2DModel, "kwargs": dit, "posterior": posterior, "inner": "transformer"},
    }


def build_pair(spec: dict, latent_dim: int, posterior_inputs: tuple[str, ...], z_map_channels: int, seed: int = 0):
    """The VRFM model (with a `z` map of `z_map_channels`), its posterior and the RF model (same backbone,
    `latent_dim=0`)."""
    torch.manual_seed(seed)
    vrfm = spec["cls"](latent_dim=latent_dim, z_map_channels=z_map_channels, **spec["kwargs"])
    torch.manual_seed(seed)
    rf = spec["cls"](latent_dim=0, **spec["kwargs"])
    channels, height, _ = vrfm.sample_shape
    encoder = VRFMConvPosteriorEncoder(
        sample_size=height,
        in_channels=channels,
        latent_dim=latent_dim,
        posterior_inputs=posterior_inputs,
        **spec["posterior"],
    )
    return vrfm, encoder, rf


def z_path_parameters(vrfm, rf) -> int:
    """The VRFM net's parameters RF lacks: its `z` MLP, its `z` map, and its input layer's weights for the map."""
    map_inputs = 0
    if vrfm.z_map is not None:
        layer = vrfm.z_map_input_layer
        map_inputs = vrfm.get_submodule(layer).weight.numel() - rf.get_submodule(layer).weight.numel()
    return count_parameters(vrfm.z_embedding) + count_parameters(vrfm.z_map) + map_inputs


def mixed_precision(device: torch.device, dtype: torch.dtype):
    """Autocast to `dtype` with fp32 weights, as `train_vrfm.py --mixed_precision` trains; nothing in fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def make_train_steps(
    vrfm, encoder, rf, batch_size: int, beta: float, seed: int = 0, device=torch.device("cpu"), dtype=torch.float32
):
    """Closures running one full optimiser step of VRFM, of RF, and of the posterior alone (for the breakdown), on
    `device` with the forward passes autocast to `dtype`."""
    shape = (batch_size, *vrfm.sample_shape)
    generator = torch.Generator(device).manual_seed(seed)
    data = torch.randn(shape, generator=generator, device=device).clamp(-1, 1)
    opt_vrfm = torch.optim.Adam(list(vrfm.parameters()) + list(encoder.parameters()), lr=1e-4)
    opt_rf = torch.optim.Adam(rf.parameters(), lr=1e-4)
    opt_enc = torch.optim.Adam(encoder.parameters(), lr=1e-4)
    vrfm.train(), rf.train(), encoder.train()

    def batch():
        x0 = torch.randn(shape, generator=generator, device=device)
        t = torch.rand(batch_size, generator=generator, device=device)
        return x0, data, t, interpolate(x0, data, t)

    def step_vrfm():
        x0, x1, t, x_t = batch()
        with mixed_precision(device, dtype):
            posterior = encoder(x0=x0, x1=x1, x_t=x_t, t=t, generator=generator)
            velocity = vrfm(x_t, t, z=posterior.sample).sample
        loss = vrfm_loss(velocity.float(), target_velocity(x0, x1), posterior.mean, posterior.logvar, beta=beta).loss
        opt_vrfm.zero_grad(set_to_none=True)
        loss.backward()
        opt_vrfm.step()

    def step_rf():
        x0, x1, t, x_t = batch()
        with mixed_precision(device, dtype):
            velocity = rf(x_t, t).sample
        loss = vrfm_loss(velocity.float(), target_velocity(x0, x1)).loss
        opt_rf.zero_grad(set_to_none=True)
        loss.backward()
        opt_rf.step()

    def step_posterior_only():
        x0, x1, t, x_t = batch()
        with mixed_precision(device, dtype):
            posterior = encoder(x0=x0, x1=x1, x_t=x_t, t=t, generator=generator)
        loss = posterior.kl.float().mean() + posterior.sample.float().pow(2).mean()
        opt_enc.zero_grad(set_to_none=True)
        loss.backward()
        opt_enc.step()

    return {"vrfm": step_vrfm, "rf": step_rf, "posterior_only": step_posterior_only}


def diffusers_loop(model_fn, shape, num_steps: int, generator: torch.Generator, converted: bool, dtype=torch.float32):
    """A stock diffusers flow-matching Euler loop with `FlowMatchEulerDiscreteScheduler` on the uniform grid, on the
    device of `generator`, from noise in `dtype`.

    With `converted=True`, `model_fn(x, t)` returns a velocity on this package's clock and is converted
    (``t = sigma_to_t(sigma)``, output ``-v``); otherwise `model_fn(x, timestep)` is a bare diffusers backbone
    called with diffusers' own timesteps (``sigma * 1000``).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    device = generator.device
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1].tolist(), device=device)
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    for timestep in scheduler.timesteps:
        if converted:
            t = sigma_to_t(timestep / scheduler.config.num_train_timesteps).reshape(()).expand(shape[0])
            output = velocity_to_flow_match_output(model_fn(x, t))
        else:
            output = model_fn(x, timestep.reshape(()).expand(shape[0]))
        x = scheduler.step(output, timestep, x).prev_sample
    return x


def make_sample_calls(vrfm, rf, inner_name: str, batch_size: int, num_steps: int, seed: int = 0):
    """Closures sampling one batch of `num_steps` Euler steps with each of the four loops, on the models' device and
    in their dtype."""
    vrfm.eval(), rf.eval()
    device, dtype = rf.device, rf.dtype
    shape = (batch_size, *vrfm.sample_shape)
    vrfm_pipe = VRFMPipeline(velocity_model=vrfm, scheduler=VRFMScheduler())
    rf_pipe = VRFMPipeline(velocity_model=rf, scheduler=VRFMScheduler())
    for pipe in (vrfm_pipe, rf_pipe):
        pipe.set_progress_bar_config(disable=True)
    inner = bare_backbone(rf, inner_name)
    labels = torch.zeros(batch_size, dtype=torch.long, device=device)

    def seeded() -> torch.Generator:
        return torch.Generator(device).manual_seed(seed)

    def bare(x, timestep):
        if inner_name == "transformer":  # a stock DiT always takes labels (one class here)
            return inner(x, timestep=timestep, class_labels=labels).sample
        return inner(x, timestep).sample

    @torch.no_grad()
    def vrfm_pipeline():
        return vrfm_pipe(batch_size, num_steps, generator=seeded(), output_type="latent")

    @torch.no_grad()
    def rf_pipeline():
        return rf_pipe(batch_size, num_steps, generator=seeded(), output_type="latent")

    @torch.no_grad()
    def diffusers_rf_wrapper():
        return diffusers_loop(lambda x, t: rf(x, t).sample, shape, num_steps, seeded(), True, dtype)

    @torch.no_grad()
    def diffusers_bare_backbone():
        return diffusers_loop(bare, shape, num_steps, seeded(), False, dtype)

    return {
        "vrfm_pipeline": vrfm_pipeline,
        "rf_pipeline": rf_pipeline,
        "diffusers_fm_rf_wrapper": diffusers_rf_wrapper,
        "diffusers_fm_bare_backbone": diffusers_bare_backbone,
    }


def bare_backbone(rf, inner_name: str) -> torch.nn.Module:
    """The stock diffusers backbone of an RF wrapper: its inner `UNet2DModel` (which has no class path when
    `latent_dim=0`), or a fresh stock `DiTTransformer2DModel` with the inner DiT's config (the wrapper swaps the DiT's
    label embedders for its own condition embedders, so its inner DiT is not stock), on the wrapper's device and in its
    dtype."""
    inner = getattr(rf, inner_name)
    if inner_name == "transformer":
        from diffusers import DiTTransformer2DModel

        torch.manual_seed(0)
        inner = DiTTransformer2DModel.from_config(inner.config).to(rf.device, rf.dtype)
    return inner.eval()


@torch.no_grad()
def converter_check(rf, batch_size: int, num_steps: int, seed: int = 0) -> float:
    """Max |difference| between `VRFMPipeline` and the converted diffusers loop on the same model, noise and grid."""
    shape = (batch_size, *rf.sample_shape)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(rf.device, rf.dtype)
    pipe = VRFMPipeline(velocity_model=rf, scheduler=VRFMScheduler())
    pipe.set_progress_bar_config(disable=True)
    ours = pipe(batch_size, num_steps, latents=noise, output_type="latent").samples
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1].tolist(), device=rf.device)
    x = noise
    for timestep in scheduler.timesteps:
        t = sigma_to_t(timestep / scheduler.config.num_train_timesteps).reshape(()).expand(batch_size)
        output = velocity_to_flow_match_output(rf(x, t).sample)
        assert torch.equal(flow_match_output_to_velocity(output), rf(x, t).sample)
        x = scheduler.step(output, timestep, x).prev_sample
    return float((ours - x).abs().max())


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats = min(args.repeats, 3)
        args.train_batch_size = min(args.train_batch_size, 4)
        args.sample_batch_size = min(args.sample_batch_size, 4)
        args.num_steps = min(args.num_steps, 2)
    specs = backbone_configs(args.quick)
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    results = {
        "meta": {
            "command": ("python -m benchmarks.speed " + " ".join(shlex.quote(a) for a in args.argv)).strip(),
            "machine": machine_description(),
            "repeats": args.repeats,
            "train_batch_size": args.train_batch_size,
            "sample_batch_size": args.sample_batch_size,
            "num_steps": args.num_steps,
            "latent_dim": args.latent_dim,
            "z_map_channels": args.z_map_channels,
            "posterior_inputs": list(args.posterior_inputs),
            "device": str(device),
            "dtype": args.dtype,
            "quick": bool(args.quick),
        },
        "backbones": {},
    }
    start = time.perf_counter()
    for name in args.backbones:
        spec = specs[name]
        vrfm, encoder, rf = build_pair(spec, args.latent_dim, tuple(args.posterior_inputs), args.z_map_channels)
        for model in (vrfm, encoder, rf):
            model.to(device)
        train_steps = make_train_steps(vrfm, encoder, rf, args.train_batch_size, args.beta, device=device, dtype=dtype)
        train = interleaved_timings(train_steps, repeats=args.repeats, warmup=2, device=device)
        vrfm.to(dtype), rf.to(dtype)  # sampling runs in the weights' dtype, as a pipeline moved with `.to(dtype)` does
        sample = interleaved_timings(
            make_sample_calls(vrfm, rf, spec["inner"], args.sample_batch_size, args.num_steps),
            repeats=args.repeats,
            warmup=1,
            device=device,
        )
        per_step = {k: [v / args.num_steps for v in values] for k, values in sample.items()}
        inner = bare_backbone(rf, spec["inner"])
        results["backbones"][name] = {
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in spec["kwargs"].items()},
            "params": {
                "velocity_vrfm": count_parameters(vrfm),
                "velocity_rf": count_parameters(rf),
                "bare_backbone": count_parameters(inner),
                "z_paths": z_path_parameters(vrfm, rf),
                "posterior": count_parameters(encoder),
            },
            "train_seconds": train,
            "sample_seconds_per_step": per_step,
            "train_ratio": median_ratio(train["vrfm"], train["rf"]),
            "posterior_share": median_ratio(train["posterior_only"], train["rf"]),
            "sample_ratio_vs_bare": median_ratio(per_step["vrfm_pipeline"], per_step["diffusers_fm_bare_backbone"]),
            "sample_ratio_vs_wrapper": median_ratio(per_step["vrfm_pipeline"], per_step["diffusers_fm_rf_wrapper"]),
            "sample_ratio_vrfm_vs_rf_pipeline": median_ratio(per_step["vrfm_pipeline"], per_step["rf_pipeline"]),
            "converter_max_abs_diff": converter_check(rf, args.sample_batch_size, args.num_steps),
        }
        print(f"[{time.perf_counter() - start:6.1f}s] {name} done", flush=True)
    results["meta"]["total_seconds"] = time.perf_counter() - start
    output_dir = Path(args.output_dir)
    write_json(output_dir / "speed.json", results)
    (output_dir / "speed.md").write_text(render_report(results))
    plot_speed(results, output_dir / "speed.png")
    return results


MS = 1000.0  # seconds to milliseconds


def median_ms(seconds: list[float], digits: int = 1) -> str:
    return f"{statistics.median(seconds) * MS:.{digits}f}"


def target_rows(backbones: dict) -> list[list]:
    """Two rows per backbone: the training-step ratio and the sampling-step ratio, each against its target."""
    rows = []
    for name, r in backbones.items():
        for quantity, ratio, target in (
            ("training step, VRFM / RF", r["train_ratio"], TRAIN_TARGET),
            (
                "sampling step, VRFMPipeline (VRFM) / FlowMatchEuler + bare backbone",
                r["sample_ratio_vs_bare"],
                SAMPLE_TARGET,
            ),
        ):
            rows.append([name, quantity, f"{ratio:.3f}x", f"<= {target}x", "met" if ratio <= target else "NOT met"])
    return rows


def training_table(backbones: dict) -> str:
    header = ["backbone", "RF step ms", "VRFM step ms", "VRFM / RF"]
    header += ["posterior alone ms (fwd + bwd + Adam)", "posterior alone / RF step"]
    rows = [
        [
            name,
            median_ms(r["train_seconds"]["rf"]),
            median_ms(r["train_seconds"]["vrfm"]),
            f"{r['train_ratio']:.3f}x",
            median_ms(r["train_seconds"]["posterior_only"]),
            f"{r['posterior_share']:.3f}x",
        ]
        for name, r in backbones.items()
    ]
    return markdown_table(header, rows)


def sampling_table(backbones: dict) -> str:
    variants = {  # column -> the key of its per-step times
        "diffusers FM + bare backbone ms": "diffusers_fm_bare_backbone",
        "diffusers FM + RF wrapper ms": "diffusers_fm_rf_wrapper",
        "VRFMPipeline RF ms": "rf_pipeline",
        "VRFMPipeline VRFM ms": "vrfm_pipeline",
    }
    ratios = {
        "VRFM / bare": "sample_ratio_vs_bare",
        "VRFM / RF wrapper": "sample_ratio_vs_wrapper",
        "VRFM / RF pipeline": "sample_ratio_vrfm_vs_rf_pipeline",
    }
    header = ["backbone", *variants, *ratios, "max |pipeline - diffusers loop| (RF)"]
    rows = [
        [name]
        + [median_ms(r["sample_seconds_per_step"][key], digits=2) for key in variants.values()]
        + [f"{r[key]:.3f}x" for key in ratios.values()]
        + [f"{r['converter_max_abs_diff']:.1e}"]
        for name, r in backbones.items()
    ]
    return markdown_table(header, rows)


def parameters_table(backbones: dict) -> str:
    header = ["backbone", "bare backbone", "RF velocity net", "VRFM velocity net"]
    header += [
        "of which z paths (MLP, map, map's input weights)",
        "posterior (training only)",
        "VRFM total in training",
    ]
    rows = []
    for name, r in backbones.items():
        p = r["params"]
        rows.append(
            [
                name,
                p["bare_backbone"],
                p["velocity_rf"],
                p["velocity_vrfm"],
                p["z_paths"],
                p["posterior"],
                p["velocity_vrfm"] + p["posterior"],
            ]
        )
    return markdown_table(header, rows)


def render_report(results: dict) -> str:
    meta, backbones = results["meta"], results["backbones"]
    lines = [
        "# Speed and overhead: VRFM vs RF on the same backbones",
        "",
        f"- Command: `{meta['command']}`",
        f"- Machine: {meta['machine']}",
        f"- {meta['repeats']} interleaved rounds; training batch {meta['train_batch_size']}, sampling batch "
        f"{meta['sample_batch_size']} x {meta['num_steps']} Euler steps per call; dim z {meta['latent_dim']}, "
        f"a z map of {meta.get('z_map_channels', 0)} channel(s), posterior q({', '.join(meta['posterior_inputs'])}) "
        "(`VRFMConvPosteriorEncoder`). Times are medians over rounds; ratios are medians of per-round ratios.",
        f"- Device `{meta.get('device', 'cpu')}`, {meta.get('dtype', 'float32')}: training autocasts to it with fp32 "
        "weights, sampling runs with the weights in it; on CUDA every timing starts and ends with the device idle.",
        f"- Total wall time: {meta['total_seconds']:.0f} s.",
    ]
    sections = {
        "Targets": markdown_table(["backbone", "quantity", "ratio", "target", "status"], target_rows(backbones)),
        "Training step": training_table(backbones),
        "Sampling, per Euler step": sampling_table(backbones),
        "Parameters": parameters_table(backbones),
    }
    for title, table in sections.items():
        lines += ["", f"## {title}", "", table]
    lines += ["", "Figure: `speed.png` (per-round times of every variant).", ""]
    return "\n".join(lines)


def plot_speed(results: dict, path: Path) -> None:
    plt = pyplot()
    names = list(results["backbones"])
    fig, axes = plt.subplots(1, 2 * len(names), figsize=(4.5 * len(names) * 2, 3.4), squeeze=False)
    for index, name in enumerate(names):
        r = results["backbones"][name]
        for offset, (key, title) in enumerate(
            (("train_seconds", "training step"), ("sample_seconds_per_step", "sampling step"))
        ):
            ax = axes[0][2 * index + offset]
            labels = list(r[key])
            ax.boxplot([[v * 1000 for v in r[key][k]] for k in labels])
            ax.set_xticks(range(1, len(labels) + 1), [label.replace("_", "\n") for label in labels], fontsize=6)
            ax.set_ylabel("ms")
            ax.set_title(f"{name}: {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["UNet", "DiT"], choices=["UNet", "DiT"])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--train-batch-size", type=int, default=32)
    parser.add_argument("--sample-batch-size", type=int, default=32)
    parser.add_argument("--num-steps", type=int, default=8, help="Euler steps per timed sampling call")
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--z-map-channels", type=int, default=4, help="VRFM's z map (train_vrfm.py's); 0: none")
    parser.add_argument("--posterior-inputs", nargs="+", default=["x1", "t"])
    parser.add_argument("--beta", type=float, default=1e-3)
    parser.add_argument("--device", default="cpu", help="where to time: cpu, cuda or cuda:N")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPES),
        help="training autocasts to it (fp32 weights); sampling runs with the weights in it",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--quick", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    with torch_threads():  # `run` sets `--threads`
        results = run(args)
    print((Path(args.output_dir) / "speed.md").read_text())
    return results


if __name__ == "__main__":
    main()
