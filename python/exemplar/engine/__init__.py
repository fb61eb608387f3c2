"""The engine (docs/design.md §4): the Attributor facade and its parts —
Settings, passes over blocks, the fitted state methods see, saved state,
the trained layer's check and the torch.distributed collectives."""
from .attributor import FORMAT, Attributor
from .settings import KFAC_DAMPINGS, Settings

__all__ = ["FORMAT", "Attributor", "KFAC_DAMPINGS", "Settings"]
