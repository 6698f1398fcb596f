"""A record of the torch calls a block makes: the host-cost guard the tests use where CI cannot
time a GPU (every dispatched call costs microseconds there, every host read a round trip)."""

import torch
from torch.overrides import TorchFunctionMode

# Torch calls that read device data back to the host (or size outputs by it).
SYNCING = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "unique",
           "nonzero", "bincount", "masked_select"}


class TorchCalls(TorchFunctionMode):
    """``names``: every torch call inside the block, in order (property reads such as
    ``.shape`` appear as ``__get__``); ``host_reads``: those that make the host wait for the
    device (``SYNCING`` calls and boolean-mask indexing), in order."""

    def __init__(self):
        super().__init__()
        self.names, self.host_reads = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        self.names.append(name)
        if name in SYNCING or (name == "__getitem__" and _is_mask(args[1])):
            self.host_reads.append(name)
        return func(*args, **(kwargs or {}))

    @property
    def dispatched(self) -> list[str]:
        """The calls that dispatch an op (every name but property reads)."""
        return [name for name in self.names if name != "__get__"]


def _is_mask(index) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
               for i in (index if isinstance(index, tuple) else (index,)))
