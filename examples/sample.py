"""Sample a saved VRFM image pipeline at several step counts, from the same noise and the same z, into one grid: a
row per step count, labelled with it, and small images enlarged (nearest neighbour) to `--cell_size` pixels.

    python examples/sample.py vrfm-digits --num_inference_steps 1 2 4 16 --output vrfm-digits/samples.png
"""

import argparse

import torch

from diffusers_vrfm import VRFMPipeline
from diffusers_vrfm.training.visuals import labelled_grid


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", help="a folder from train_vrfm.py or VRFMPipeline.save_pretrained, or a Hub id")
    parser.add_argument("--num_inference_steps", type=int, nargs="+", default=[1, 2, 4, 16])
    parser.add_argument("--num_samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="samples.png")
    parser.add_argument("--cell_size", type=int, default=64, help="smallest size of a sample in the grid, in pixels")
    args = parser.parse_args()

    pipe = VRFMPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    if not pipe.is_image_model:
        parser.error(f"{args.pipeline!r} holds a vector model; this script draws image grids.")
    generator = torch.Generator().manual_seed(args.seed)
    model = pipe.velocity_model
    latents = torch.randn(args.num_samples, *model.sample_shape, generator=generator)
    # one z per column, drawn as the pipeline draws it: from its prior component if it has one, else N(0, I)
    z = pipe.prepare_z(args.num_samples, generator, model.device, model.dtype, source=latents)
    rows, labels = [], []
    for steps in args.num_inference_steps:
        out = pipe(batch_size=args.num_samples, num_inference_steps=steps, latents=latents, z=z)
        rows.append(out.images)
        labels.append(f"NFE {out.num_function_evals}")
        print(f"{steps:>3} Euler step(s): {out.num_function_evals} model evaluations per sample")
    grid = labelled_grid(rows, labels, min_cell=args.cell_size)
    grid.save(args.output)
    print(f"wrote {args.output}: one row per step count {args.num_inference_steps}, same noise and z in each column")


if __name__ == "__main__":
    main()
