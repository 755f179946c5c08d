"""Names of the choices that the command line lists, in a module that imports nothing, so that `train_vrfm.py --help`
and argument checks run without loading torch. The modules that implement the choices import them from here."""

TIMESTEP_DENSITIES = ("uniform", "logit_normal", "mode")
MODE_SCALE_RANGE = (-1.0, 1.7519383938841089)  # [-1, 2 / (pi - 2)]: SD3's "mode" map is monotone there
LOSS_REDUCTIONS = ("sum", "mean")
TOY_PREFIX = "toy:"
