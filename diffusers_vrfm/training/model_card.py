"""The model card of a trained VRFM pipeline, rendered from a template in `model_cards/` with huggingface_hub."""

from __future__ import annotations

import json
import os
import shlex

DEFAULT_TEMPLATE = os.path.join(os.path.dirname(__file__), "..", "..", "model_cards", "vrfm_pipeline.md")
BASE_TAGS = ("diffusers", "vrfm", "rectified-flow", "flow-matching", "diffusers-training")
SECRET_ARGUMENTS = ("hub_token",)


def format_metric(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def training_command(
    argv: list[str], num_processes: int = 1, script: str = "train_vrfm.py", accelerate_launch: bool = True
) -> str:
    """The command line that reproduces a run, with secrets removed (`python script` for a plain 1-process run)."""
    cleaned, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        if token.split("=", 1)[0] in ("--hub_token",):
            skip = "=" not in token
            continue
        cleaned.append(token)
    if num_processes > 1:
        launcher = f"accelerate launch --multi_gpu --num_processes {num_processes} {script}"
    else:
        launcher = f"accelerate launch {script}" if accelerate_launch else f"python {script}"
    return launcher + ("" if not cleaned else " " + shlex.join(cleaned))


def public_config(args: dict) -> dict:
    """The run's arguments without secrets or private attributes, JSON-serialisable."""
    config = {}
    for key, value in sorted(args.items()):
        if key.startswith("_") or key in SECRET_ARGUMENTS:
            continue
        config[key] = value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else str(value)
    return config


def card_metadata(
    license: str,
    data_kind: str,
    num_classes: int | None,
    text_to_image: str | None,
    latent_dim: int,
    hub_dataset_id: str | None,
    base_model: str | None,
):
    """The card's YAML metadata (a `huggingface_hub.ModelCardData`): see [`render_model_card`]."""
    from huggingface_hub import ModelCardData

    tags = list(BASE_TAGS)
    if text_to_image:
        tags.append("text-to-image")
    elif data_kind == "image":
        tags.append("class-conditional-image-generation" if num_classes else "unconditional-image-generation")
    if latent_dim == 0:
        tags.append("rectified-flow-baseline")
    if text_to_image:
        pipeline_tag = "text-to-image"
    elif data_kind == "image" and not num_classes:
        pipeline_tag = "unconditional-image-generation"
    else:
        pipeline_tag = None
    base_model_is_hub_id = base_model is not None and not os.path.exists(base_model)
    return ModelCardData(
        library_name="diffusers",
        license=license,
        tags=tags,
        datasets=[hub_dataset_id] if hub_dataset_id else None,
        base_model=base_model if base_model_is_hub_id else None,
        pipeline_tag=pipeline_tag,
    )


def render_model_card(
    *,
    repo_id: str,
    args: dict,
    argv: list[str],
    data_kind: str,
    dataset_description: str,
    hub_dataset_id: str | None,
    velocity_class: str,
    velocity_parameters: int,
    velocity_note: str = "",
    posterior_description: str,
    base_model: str | None,
    num_processes: int,
    global_batch_size: int,
    metrics: dict,
    metric_window: int,
    sample_image: str | None,
    sample_caption: str = "",
    license: str = "apache-2.0",
    num_classes: int | None = None,
    template_path: str | None = None,
    accelerate_launch: bool = True,
    skipped_updates: int = 0,
    text_to_image: str | None = None,
    example_prompt: str = "",
):
    """Renders the card; returns a `huggingface_hub.ModelCard` (write it with `.save(path)`).

    `skipped_updates` (the updates skipped for a non-finite loss or gradient) is stated in the training section.

    Metadata: `library_name: diffusers`, the VRFM tags, the licence, the dataset (when it is a Hub dataset),
    `base_model` (when fine-tuned from a Hub model) and a `pipeline_tag` for image models. `text_to_image` is
    `"pipeline"` or `"adapter"` (a LoRA adapter folder) for text-to-image runs, whose usage prompts with
    `example_prompt`. `velocity_note` adds a sentence on the velocity model (its `z` map, for example).
    """
    from huggingface_hub import ModelCard

    template_path = template_path or DEFAULT_TEMPLATE
    if not os.path.isfile(template_path):
        raise FileNotFoundError(
            f"The model card template {template_path!r} does not exist; pass `--model_card_template` with a path to "
            "one (model_cards/vrfm_pipeline.md in the diffusers-vrfm repository)."
        )
    latent_dim = int(args.get("latent_dim") or 0)
    card_data = card_metadata(license, data_kind, num_classes, text_to_image, latent_dim, hub_dataset_id, base_model)
    load_code, usage_call, model_kind, source_note = _usage(
        repo_id, data_kind, num_classes, text_to_image, example_prompt
    )
    condition = "prompt" if text_to_image else "label" if num_classes else None
    notes = _training_notes(args, latent_dim, base_model, skipped_updates, condition)
    card = ModelCard.from_template(
        card_data,
        template_path=template_path,
        model_name=repo_id.split("/")[-1],
        model_kind=model_kind,
        repo_id=repo_id,
        usage_call=usage_call,
        load_code=load_code,
        remote_code=text_to_image != "adapter",
        source_note=source_note,
        sample_image=sample_image,
        sample_caption=sample_caption,
        dataset_description=dataset_description,
        velocity_class=velocity_class,
        velocity_parameters=f"{velocity_parameters:,}",
        velocity_note=velocity_note,
        base_model_note=notes["base_model_note"],
        posterior_description=posterior_description,
        latent_dim=latent_dim,
        beta=args.get("beta"),
        kl_target=notes["kl_target"],
        prior_description=notes["prior_description"],
        beta_warmup_steps=args.get("beta_warmup_steps"),
        loss_reduction=args.get("loss_reduction"),
        free_bits=args.get("free_bits"),
        timestep_density=args.get("timestep_density"),
        num_processes=num_processes,
        global_batch_size=global_batch_size,
        max_train_steps=args.get("max_train_steps"),
        ema_note=notes["ema_note"],
        skipped_note=notes["skipped_note"],
        command=training_command(argv, num_processes, accelerate_launch=accelerate_launch),
        config_json=json.dumps(public_config(args), indent=2, sort_keys=True),
        metrics=[(name, format_metric(value)) for name, value in metrics.items()],
        metric_window=metric_window,
        limitations=notes["limitations"],
    )
    return card


def _usage(repo_id: str, data_kind: str, num_classes, text_to_image: str | None, example_prompt: str):
    """The card's loading code, usage call, model kind and source note."""
    load_code = f'from diffusers_vrfm import VRFMPipeline\n\npipe = VRFMPipeline.from_pretrained("{repo_id}")'
    if data_kind == "image":
        if num_classes:
            count = min(num_classes, 10)
            usage_call = (
                f"images = pipe(batch_size={count}, class_labels=list(range({count})), guidance_scale=1.5, "
                "num_inference_steps=8).images"
            )
        else:
            usage_call = "images = pipe(batch_size=16, num_inference_steps=8).images  # a list of PIL images"
        model_kind = "class-conditional image model" if num_classes else "image model"
        source_note = ""
        if text_to_image:
            load_code, usage_call, model_kind = _text_to_image_usage(repo_id, text_to_image, example_prompt)
    else:
        usage_call = "samples = pipe(batch_size=1000, num_inference_steps=4).samples  # (1000, dim) tensor"
        model_kind = "model of vector (toy) data"
        source_note = (
            "This toy task transports a specific source distribution (not `N(0, I)`) to the target: pass source "
            "samples as `latents=` (e.g. `diffusers_vrfm.data.get_toy_task(name).sample_source(n)`), otherwise the "
            "pipeline starts from `N(0, I)`."
        )
    return load_code, usage_call, model_kind, source_note


def _prior_description(args: dict, latent_dim: int, condition: str | None) -> str:
    """What the card says the pipeline draws `z` from."""
    atoms = int(args.get("aggregate_prior_atoms") or 0)
    if latent_dim == 0:
        return "none (no `z`)"
    if atoms > 0:
        fitted = (
            f"`VRFMFlowPrior`, a small RealNVP fitted after training to the posteriors of {atoms:,} training examples"
            if args.get("aggregate_prior_type") == "flow"
            else f"`VRFMAggregatePosteriorPrior`, the posteriors of {atoms:,} training examples fitted after training"
        )
        if condition is not None:
            caption = "label" if condition == "label" else "caption"
            fitted += f", each with its example's {caption}; a trajectory draws " + (
                f"from the flow's `p(z | {condition})`"
                if args.get("aggregate_prior_type") == "flow"
                else f"among the atoms of its {condition}"
            )
        reencode_z_at = args.get("reencode_z_at")
        reencoded = (
            f". The pipeline's calls re-encode `z` once, at the first step at or after `t = {reencode_z_at}`, as the "
            "posterior mean of the image the trajectory heads for (`reencode_z_at`, saved with it; pass "
            "`reencode_z_at=1` to keep the drawn `z`)"
            if reencode_z_at is not None and reencode_z_at < 1
            else ""
        )
        return (
            f"{fitted}: each trajectory draws its `z` where training put it (the pipeline's `prior` component). Keep "
            "it: the aggregate posterior is not `N(0, I)`, and `z ~ N(0, I)` lands where training never put `z` (a "
            f"prior hole; with the image defaults it measured 5x the FD at many steps on MNIST){reencoded}"
        )
    if args.get("learned_prior"):
        return "a learned conditional prior `p(z | x0)`, drawn at each trajectory's source point"
    return "`N(0, I)`"


def _training_notes(
    args: dict, latent_dim: int, base_model: str | None, skipped_updates: int, condition: str | None = None
) -> dict:
    """The sentences of the card's training section that depend on the run's settings (`condition`: what a
    conditional model's prior is keyed by, `"label"` or `"prompt"`)."""
    if base_model is None:
        base_model_note = ""
    elif args.get("_pretrained_kind") == "pipeline":
        base_model_note = f"training continued from the VRFM pipeline `{base_model}`"
    else:
        base_model_note = f"fine-tuned from the backbone `{base_model}` (zero-initialised `z` path)"
    ema_note = (
        f"max decay {args.get('ema_max_decay')}, warm-up power {args.get('ema_power')}"
        if args.get("use_ema", True)
        else "EMA off: the raw weights"
    )
    prior_description = _prior_description(args, latent_dim, condition)
    kl_target = args.get("kl_target")
    kl_target = kl_target if isinstance(kl_target, (int, float)) and latent_dim > 0 else None
    steps = args.get("max_train_steps") or 0
    limitations = (
        f"A short, demonstration-scale run ({steps} steps): it shows the method and the pipeline working, not the "
        "sample quality of a full training run (see docs/training.md for GPU recipes)."
        if steps <= 5000
        else "Check sample quality at both few and many steps for your use: VRFM's gain is largest at few steps, and "
        "a posterior that carries too much information can hurt many-step sampling (a prior hole)."
    )
    skipped_note = (
        "none"
        if not skipped_updates
        else f"{skipped_updates} of {args.get('max_train_steps')} updates were skipped (`--nonfinite_policy skip`); "
        "they left the weights and the optimizer state unchanged (the EMA averaged in those unchanged weights)"
    )
    return {
        "base_model_note": base_model_note,
        "ema_note": ema_note,
        "prior_description": prior_description,
        "kl_target": kl_target,
        "limitations": limitations,
        "skipped_note": skipped_note,
    }


def _text_to_image_usage(repo_id: str, text_to_image: str, example_prompt: str) -> tuple[str, str, str]:
    """The card's loading code, sampling call and model kind for a text-to-image pipeline or LoRA adapter."""
    usage_call = f"images = pipe({example_prompt!r}, num_inference_steps=8, guidance_scale=3.0).images"
    if text_to_image == "adapter":
        load_code = (
            "from huggingface_hub import snapshot_download\n"
            "from diffusers_vrfm import VRFMTextToImagePipeline\n\n"
            "# the adapter folder loads on top of its base pipeline (named in vrfm_adapter.json)\n"
            f'pipe = VRFMTextToImagePipeline.from_vrfm_adapter(snapshot_download("{repo_id}"))'
        )
        return load_code, usage_call, "text-to-image LoRA adapter"
    load_code = (
        "from diffusers_vrfm import VRFMTextToImagePipeline\n\n"
        f'pipe = VRFMTextToImagePipeline.from_pretrained("{repo_id}")'
    )
    return load_code, usage_call, "text-to-image model"
