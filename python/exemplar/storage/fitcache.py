"""The fit cache inside a store (fits/<tag>/): what Attributors fitted on it,
each file with a SHA-256 of its tensors, read whole (never mapped) and
checked when read; kept in memory, said once, when the store is read-only."""
from __future__ import annotations

import errno
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import save as save_bytes

from .blocks import Columns
from .manifest import StoreError
from .saved import digest, first_difference, read_whole, tensors_digest, write_atomic

# What says a store's folder cannot take the fit cache: the fits are kept in memory instead.
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def _read_safetensors(file: Path, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a whole safetensors file read into memory (never
    mapped: a file truncated later cannot fault a reader); a StoreError names
    the file when it is not one."""
    try:
        return read_whole(file)
    except ValueError as err:
        raise StoreError(f"{what} {file} is not a readable safetensors file ({err.__cause__}); delete it to "
                         "recompute") from None


class StoreColumns(Columns):
    """An Attributor's fits on a store (storage.Store), under fits/<tag>/ (tag: what they
    depend on): the curvature and whole-set fits in fitted.safetensors
    (written by every rank: identical content, atomic renames, so shared and
    node-local stores both get it), and per-example values one file per key and shard,
    so a second Attributor with the same settings reads them instead of
    recomputing. Every file records a SHA-256 of its tensors and is checked
    when read; per-example values also for shape, dtype and finiteness. On a
    read-only store the fits are kept in memory, said once."""

    def __init__(self, store, identity):
        self.folder = store.path / "fits" / identity.tag
        self.where = str(self.folder / "fitted.safetensors")
        self.meta = identity.meta
        self.sizes, self.dtype = store.sizes, store.dtype
        self.memory: dict[tuple[str, int], torch.Tensor] | None = None  # the fallback when read-only
        self.memory_fitted = None

    def _file(self, key: str, index: int) -> Path:
        return self.folder / key / f"{index:05d}.safetensors"

    def _read_only(self, err: OSError) -> bool:
        """True (after one warning) when `err` says the store cannot be written."""
        if err.errno not in _READ_ONLY:
            return False
        if self.memory is None:
            warnings.warn(f"store {self.folder.parents[1]} is read-only ({err.strerror}): the fits of this "
                          "Attributor are kept in memory and computed again by the next one", stacklevel=4)
            self.memory = {}
        return True

    def get(self, keys, index: int):
        if self.memory is not None and all((k, index) in self.memory for k in keys):
            return tuple(self.memory[(k, index)] for k in keys)
        files = [self._file(k, index) for k in keys]
        if not all(f.exists() for f in files):
            return None
        return tuple(self._column(f, index) for f in files)

    def _column(self, file: Path, index: int) -> torch.Tensor:
        tensors, meta = _read_safetensors(file, "fit cache file")
        value = tensors.get("value")
        rows = self.sizes[index]
        problem = None
        if value is None or set(tensors) != {"value"}:
            problem = f"holds {sorted(tensors)}, not one tensor 'value'"
        elif tuple(value.shape) != (rows,) or value.dtype != self.dtype:
            problem = f"holds shape {tuple(value.shape)} {value.dtype}, not shape ({rows},) {self.dtype}"
        elif meta.get("sha256") != digest(value):
            problem = "does not match the checksum recorded when it was written"
        elif not bool(torch.isfinite(value).all()):
            problem = "holds non-finite values"
        if problem:
            raise StoreError(f"fit cache file {file} {problem}: it was damaged or replaced; delete "
                             f"{self.folder} to recompute")
        return value

    def put(self, keys, index: int, values) -> None:
        for key, value in zip(keys, values):
            value = value.detach().cpu().contiguous()
            if self.memory is None:
                try:
                    self._file(key, index).parent.mkdir(parents=True, exist_ok=True)
                    write_atomic(self._file(key, index), save_bytes({"value": value},
                                                                    metadata={"sha256": digest(value)}))
                    continue
                except OSError as err:
                    if not self._read_only(err):
                        raise
            self.memory[(key, index)] = value

    def whole(self) -> dict[str, torch.Tensor]:
        shards = range(len(self.sizes))
        keys = sorted(p.name for p in self.folder.glob("*") if p.is_dir())
        found = {k: [self.get((k,), i) for i in shards] for k in keys}
        return {k: torch.cat([v for (v,) in parts]) for k, parts in found.items() if all(parts)}

    def put_whole(self, key: str, value: torch.Tensor) -> None:
        for index, part in enumerate(value.split(self.sizes)):
            self.put((key,), index, (part,))

    def save_fitted(self, tensors: dict[str, torch.Tensor], kinds: dict[str, str]) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        if self.memory is not None:
            self.memory_fitted = (tensors, kinds)
            return
        meta = {"kinds": json.dumps(kinds, sort_keys=True), "identity": json.dumps(self.meta, sort_keys=True),
                "sha256": tensors_digest(tensors)}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(self.folder / "fitted.safetensors", save_bytes(tensors, metadata=meta))
        except OSError as err:
            if not self._read_only(err):
                raise
            self.memory_fitted = (tensors, kinds)

    def load_fitted(self):
        """(tensors, kinds) as save_fitted was given them, or None; the file is
        read whole and its checksum and identity checked (shapes, dtypes and
        values are the engine's to check against the settings)."""
        if self.memory_fitted is not None:
            return self.memory_fitted
        file = self.folder / "fitted.safetensors"
        if not file.exists():
            return None
        tensors, meta = _read_safetensors(file, "fit cache file")
        problem = None
        try:
            kinds, identity = json.loads(meta["kinds"]), json.loads(meta["identity"])
        except (KeyError, TypeError, ValueError):
            kinds, identity, problem = None, None, "has no readable 'kinds' and 'identity' metadata"
        if problem is None and meta.get("sha256") != tensors_digest(tensors):
            problem = "does not match the checksum recorded when it was written"
        elif problem is None and identity != self.meta:
            key = first_difference(identity, self.meta) if isinstance(identity, dict) else None
            problem = (f"was fitted for {key}={identity.get(key)!r}, not {self.meta.get(key)!r}" if key
                       else f"records identity {identity!r}, not a JSON object")
        elif problem is None and not (isinstance(kinds, dict) and all(isinstance(v, str) for v in kinds.values())):
            problem = f"has curvature kinds {kinds!r}, not a JSON object of names"
        if problem:
            raise StoreError(f"fit cache file {file} {problem}: it was damaged or replaced; delete "
                             f"{self.folder} to recompute")
        return tensors, kinds
