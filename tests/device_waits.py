"""What would make the host wait for a GPU, seen on a CPU run (not a test module): the training loop's and the
sampling loop's tests count it."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ATEN = torch.ops.aten
# Operators that wait on CUDA for every kernel queued before them, whatever device a test runs on.
WAITING_OPERATORS = {
    ATEN._local_scalar_dense.default: "read of a value",  # .item(), bool(), float(), int(), an `if` on a tensor
    ATEN.lift_fresh.default: "tensor made from host data",  # torch.tensor, as_tensor, from_numpy: then a host copy
    ATEN.equal.default: "read of a value",
    ATEN.allclose.default: "read of a value",  # a bool made inside the operator: no `_local_scalar_dense` is seen
    ATEN.is_nonzero.default: "read of a value",
    **dict.fromkeys(
        (
            ATEN.nonzero.default,  # also torch.where(condition) with one argument
            ATEN.masked_select.default,
            ATEN._unique2.default,
            ATEN.unique_dim.default,
            ATEN.unique_consecutive.default,
        ),
        "output shape read from the values",
    ),
}
# read a tensor's memory on the host without an operator, or copy it there (`.cpu()` dispatches nothing on a CPU
# tensor, but waits for the device on a CUDA one)
HOST_READS = ("tolist", "numpy", "cpu")


def count_host_reads(monkeypatch, waits: list, active: dict | None = None) -> None:
    """Makes each of the `HOST_READS` methods append "read of a tensor (<name>)" to `waits` (while `active["on"]`,
    when given), for the rest of the test: they read a tensor's memory without an operator `DeviceWaits` would see."""
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if active is None or active["on"]:
                waits.append(f"read of a tensor ({_name})")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)


def waits_on_cuda(func, args, kwargs) -> str | None:
    """What makes operator `func`, called with `args` and `kwargs`, wait for the device on CUDA, or `None`."""
    if func in WAITING_OPERATORS:
        return WAITING_OPERATORS[func]
    if func in (ATEN.index.Tensor, ATEN.index_put_.default, ATEN.index_put.default):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(index is not None and index.dtype == torch.bool for index in indices):
            return "output shape read from the values"  # x[mask], x[mask] = v
    if func is ATEN.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "output shape read from the values"
    return None


class DeviceWaits(TorchDispatchMode):
    """Records, while `active["on"]`, each operator that would make the host wait for the GPU (`waits_on_cuda`). A
    CPU run cannot see the wait itself (a tensor made from host data, for one, waits in the copy to the device that
    follows), but it sees the operator that causes it."""

    def __init__(self, waits: list, active: dict):
        super().__init__()
        self.waits, self.active = waits, active

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active["on"] and (reason := waits_on_cuda(func, args, kwargs)):
            self.waits.append(reason)
        return func(*args, **kwargs)
