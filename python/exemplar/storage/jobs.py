"""A folder of per-block results for a long query, so a killed query resumes:
job.json says what the job is; each block's result is written whole
(temporary file, then rename) as block-00000.safetensors, ..."""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from ..progress import Progress
from .saved import write_atomic
from .store import StoreError


def tensor_checksum(*tensors: torch.Tensor | None) -> str:
    """CRC-32 of the tensors' bytes: names a test set in job.json."""
    crc = 0
    for t in tensors:
        if t is not None:
            crc = zlib.crc32(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


class ResultFolder:
    """Opens `path` for the job `settings` (a JSON-able dict): creates it, or
    reopens one holding the same job; a folder holding another job is refused
    and left as it is."""

    def __init__(self, path: str | os.PathLike, settings: dict, writer: bool = True):
        self.path, self.writer = Path(path), writer
        manifest = self.path / "job.json"
        if manifest.exists():
            held = json.loads(manifest.read_text())
            for key in sorted(set(held) | set(settings)):
                if held.get(key) != settings.get(key):
                    raise StoreError(f"{self.path} holds another job: {key} is {held.get(key)!r} there, "
                                     f"{settings.get(key)!r} here; use another out= folder (nothing was changed)")
        elif self.path.exists() and any(self.path.iterdir()):
            raise StoreError(f"{self.path} exists and is not a job folder: refusing to write into it")
        elif writer:
            self.path.mkdir(parents=True, exist_ok=True)
            write_atomic(manifest, (json.dumps(settings, indent=1, sort_keys=True) + "\n").encode())

    def _file(self, block: int) -> Path:
        return self.path / f"block-{block:05d}.safetensors"

    def load(self, block: int) -> dict[str, torch.Tensor] | None:
        """Block `block`'s result, or None when it is not there yet."""
        file = self._file(block)
        return load_bytes(file.read_bytes()) if file.exists() else None

    def save(self, block: int, tensors: dict[str, torch.Tensor]) -> None:
        """Writes block `block`'s result whole (the writer rank only)."""
        if self.writer:
            write_atomic(self._file(block), save_bytes({k: v.cpu().contiguous() for k, v in tensors.items()}))


def resumable(folder: ResultFolder, blocks: int, compute, label: str, progress: bool | None) \
        -> list[dict[str, torch.Tensor]]:
    """Each of `blocks` results: the one in `folder`, or compute(b) written
    there as soon as it is done, so a killed job loses at most one block."""
    done, bar = [], Progress(label, blocks, progress)
    for b in range(blocks):
        result = folder.load(b)
        if result is None:
            result = compute(b)
            folder.save(b, result)
        done.append(result)
        bar.update()
    bar.close()
    return done
