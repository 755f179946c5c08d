"""Names of the choices that the command line lists, and the check of the time densities' parameters, in a module that
imports nothing, so that `train_vrfm.py --help` and argument checks run without loading torch. The modules that
implement the choices import them from here."""

TIMESTEP_DENSITIES = ("uniform", "logit_normal", "mode")
MODE_SCALE_RANGE = (-1.0, 1.7519383938841089)  # [-1, 2 / (pi - 2)]: SD3's "mode" map is monotone there
LOSS_REDUCTIONS = ("sum", "mean")
TOY_PREFIX = "toy:"


def density_parameter_problem(
    density: str, logit_std: float, mode_scale: float, noise_end_fraction: float = 0.0
) -> tuple[str, float, str] | None:
    """The parameter that a training-time density cannot use, as `(name, value, what is valid)`, or `None`: the one
    check behind `sample_timesteps`, `VRFMScheduler` and `train_vrfm.py`'s argument checks. `noise_end_fraction`,
    the weight of an atom at t = 0, lies in [0, 1): all the mass at one time would train nothing else."""
    if not 0.0 <= noise_end_fraction < 1.0:
        return "noise_end_fraction", noise_end_fraction, "in [0, 1)"
    if density == "logit_normal" and not 0 < logit_std < float("inf"):
        return "logit_std", logit_std, "a finite number > 0 for the logit-normal density"
    low, high = MODE_SCALE_RANGE
    if density == "mode" and not low <= mode_scale <= high:
        valid = f"in [{low:g}, 2 / (pi - 2) = {high:.4f}] for the mode density (where its map is monotone)"
        return "mode_scale", mode_scale, valid
    return None
