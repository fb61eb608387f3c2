"""A folder of per-block results for a long query, so a killed query resumes:
job.json says what the job is (the training set's and the test set's
content, the settings, the layer, the method, k, direction, precision); each
block's result is written whole (temporary file, then rename) as
block-00000.safetensors, ... and checked like user input when read back."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save as save_bytes

from ..progress import Progress
from .saved import first_difference, read_whole, write_atomic
from .store import StoreError


class ResultFolder:
    """Opens `path` for the job `settings` (a JSON-able dict): creates it, or
    reopens one holding the same job; a folder holding another job, or a
    damaged job.json, is refused and left as it is. Every rank may write
    (identical content, atomic renames), so the folder may be shared or
    node-local."""

    def __init__(self, path: str | os.PathLike, settings: dict):
        self.path = Path(path)
        manifest = self.path / "job.json"
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} is a file, not a job folder: use another out= folder")
        if manifest.exists():
            try:
                held = json.loads(manifest.read_text())
            except ValueError as err:
                raise StoreError(f"{manifest} is not valid JSON ({err}): not a job folder this exemplar "
                                 "wrote; use another out= folder") from None
            if not isinstance(held, dict):
                raise StoreError(f"{manifest} must hold a JSON object, got {type(held).__name__}: not a job "
                                 "folder this exemplar wrote; use another out= folder")
            key = first_difference(held, settings)
            if key is not None:
                raise StoreError(f"{self.path} holds another job: {key} is {held.get(key)!r} there, "
                                 f"{settings.get(key)!r} here; use another out= folder, or delete this "
                                 "one to start over (nothing was changed)")
        elif self.path.exists() and any(p for p in self.path.iterdir() if not _own_temporary(p)):
            raise StoreError(f"{self.path} exists and is not a job folder: refusing to write into it")
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            write_atomic(manifest, (json.dumps(settings, indent=1, sort_keys=True) + "\n").encode())

    def _file(self, block: int) -> Path:
        return self.path / f"block-{block:05d}.safetensors"

    def load(self, block: int, expected: dict[str, tuple[tuple, torch.dtype]], N: int):
        """Block `block`'s result, or None when it is not there yet; checked to
        hold exactly the `expected` tensors (name -> (shape, dtype)) with every
        "indices" entry in [0, N)."""
        file = self._file(block)
        if not file.exists():
            return None
        try:
            tensors, _ = read_whole(file)
        except ValueError as err:
            raise StoreError(f"{file} is not a readable result block ({err.__cause__}); delete it to "
                             "recompute") from None
        if set(tensors) != set(expected):
            raise StoreError(f"{file} holds {sorted(tensors)}, expected {sorted(expected)}; delete it to recompute")
        for name, (shape, dtype) in expected.items():
            t = tensors[name]
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise StoreError(f"{file}: {name} has shape {tuple(t.shape)} {t.dtype}, expected shape {shape} "
                                 f"{dtype} for this block; delete it to recompute")
        indices = tensors.get("indices")
        if indices is not None and indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= N):
            raise StoreError(f"{file}: indices must be training rows in [0, {N}), found "
                             f"{int(indices.min())}..{int(indices.max())}; delete it to recompute")
        return tensors

    def save(self, block: int, tensors: dict[str, torch.Tensor]) -> None:
        """Writes block `block`'s result whole."""
        write_atomic(self._file(block), save_bytes({k: v.cpu().contiguous() for k, v in tensors.items()}))


def _own_temporary(path: Path) -> bool:
    """A temporary file write_atomic is writing (another rank's job.json, say)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def resumable(folder: ResultFolder | None, blocks: int, compute, expected, N: int, label: str,
              progress: bool | None, all_have=lambda have: have) -> list[dict[str, torch.Tensor]]:
    """Each of `blocks` results: the one in `folder` (checked against
    expected(b)), or compute(b) written there as soon as it is done, so a
    killed job loses at most one block (folder None: every block computed,
    nothing written). all_have(have) -> bool decides
    together with the other ranks whether a block is read or computed (every
    rank must compute it when any lacks it)."""
    done, bar = [], Progress(label, blocks, progress)
    for b in range(blocks):
        result = None if folder is None else folder.load(b, expected(b), N)
        if not all_have(result is not None):
            result = compute(b)
            if folder is not None:
                folder.save(b, result)
        done.append(result)
        bar.update()
    bar.close()
    return done
