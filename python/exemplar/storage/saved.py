"""Files on disk: every file exemplar writes goes through write_atomic; fitted
state is one safetensors file with the settings as JSON under the metadata key
"exemplar", written atomically and read whole (never pickle, never mapped);
`digest` names content (tensors, bytes, text) for fingerprints and checksums."""
from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from pathlib import Path

import torch


def digest(*parts) -> str:
    """SHA-256 (hex) of tensors (their dtype, shape and bytes), bytes and
    strings, in order; None counts as a part of its own. Equal content, equal
    digest, on any device and in any process."""
    h = hashlib.sha256()
    for part in parts:
        if part is None:
            h.update(b"\0none")
        elif isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            h.update(f"\0{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().data if t.numel() else b"")
        elif isinstance(part, bytes):
            h.update(b"\0b" + part)
        else:
            h.update(b"\0s" + str(part).encode())
    return h.hexdigest()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """digest of a dict of tensors, by sorted key: the checksum fit files record."""
    return digest(*(x for key in sorted(tensors) for x in (key, tensors[key])))


def first_difference(held: dict, here: dict):
    """The first key (sorted) whose value differs between two recorded dicts, or None."""
    return next((key for key in sorted(set(held) | set(here)) if held.get(key) != here.get(key)), None)


def read_whole(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a safetensors file read whole into memory (never
    mapped: a file truncated later cannot fault a reader); a ValueError says
    when it is not one (OSError as it comes)."""
    import safetensors.torch

    try:
        data = Path(path).read_bytes()
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        tensors = safetensors.torch.load(data)
    except OSError:
        raise
    except Exception as err:  # the format's own errors vary by version
        raise ValueError(f"{path} is not a safetensors file ({err})") from err
    return tensors, (header.get("__metadata__") or {}) if isinstance(header, dict) else {}


def write_atomic(path, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file beside it and a rename,
    so `path` holds either its old content or all of the new; a failed write
    removes the temporary file."""
    path = Path(path)
    # A name of its own per writer: ranks, processes and threads may write the same file at once.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write(path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Writes `tensors` and `meta` to `path` atomically (write_atomic), so a
    failed save leaves any earlier file as it was."""
    import safetensors.torch

    write_atomic(path, safetensors.torch.save({k: v.cpu() for k, v in tensors.items()},
                                              metadata={"exemplar": json.dumps(meta)}))


def read(path, fmt: str, keys: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a file `write` made with meta["format"] == fmt and
    the given keys; any other file is refused with an error naming what is wrong."""
    tensors, metadata = read_whole(path)
    raw = metadata.get("exemplar")
    if raw is None:
        raise ValueError(f"{path} is not a file of format {fmt!r} (no 'exemplar' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata 'exemplar' is not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: metadata 'exemplar' must be a JSON object, got {type(meta).__name__}")
    for key in ("format", *keys):
        if key not in meta:
            raise ValueError(f"{path}: missing key '{key}' in metadata 'exemplar'")
    if meta["format"] != fmt:
        raise ValueError(f"{path} is not a file of format {fmt!r} (format {meta['format']!r})")
    if not isinstance(meta.get("attributor", {}), dict):
        raise ValueError(f"{path}: 'attributor' must be a JSON object, got {type(meta['attributor']).__name__}")
    return tensors, meta
