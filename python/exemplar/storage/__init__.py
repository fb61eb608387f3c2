"""Where training rows and what is fitted on them live (docs/design.md §3,
§4): the TrainingSet / Blocks / Columns protocol (blocks.py), the in-memory
backend (memory.py), the on-disk sharded store (store.py), resumable job
folders (jobs.py) and saved-state files (saved.py)."""
from __future__ import annotations

import os

from ..data import LastLayerData
from .blocks import Block, Blocks, Columns, TrainingSet, block_rows
from .memory import InMemory
from .store import Store, StoreError, StoreWriter, write_store


def training_set(train, bias: bool) -> TrainingSet:
    """The backend for what an Attributor was given: a LastLayerData (with
    labels), an exemplar.Store, or a store's path; bias (the layer has one)
    sizes in-memory blocks."""
    if isinstance(train, (str, os.PathLike)):
        train = Store(train)
    if isinstance(train, Store):
        return train
    if isinstance(train, LastLayerData):
        return InMemory(train, train.num_features + bias)
    raise TypeError(f"train must be a LastLayerData or an exemplar.Store, got {type(train).__name__}")


__all__ = ["Block", "Blocks", "Columns", "TrainingSet", "block_rows", "InMemory", "Store", "StoreError",
           "StoreWriter", "write_store", "training_set"]
