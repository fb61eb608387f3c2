"""A store's manifest.json and shard headers, read like user input: every
field's type and range checked, every shard file's header against the
manifest; errors are StoreErrors naming the file and the field."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

FORMAT = "exemplar-store"
VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_ROWS = 65536
# Rows per chunk of the content fingerprint (content.py), on a grid fixed whatever the shard size.
CONTENT_ROWS = 4096
DTYPES = {"float32": torch.float32, "float64": torch.float64}
SAFETENSORS_DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64}


class StoreError(ValueError):
    """A store that is missing, damaged, or not the one expected."""


def manifest_bytes(manifest: dict) -> bytes:
    """The manifest as written: sorted, indented JSON."""
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" for torch.float32, as the manifest names dtypes."""
    return str(dtype).removeprefix("torch.")


def check_shard(path: Path, manifest: dict, shard: dict) -> None:
    """The shard file exists, has the manifest's size, and its own header agrees
    with the manifest (catches a manifest from another store before any data
    is read; the CRC-32 is checked when the shard is read)."""
    file = path / shard["file"]
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n < (1 << 24) else None
    except FileNotFoundError:
        raise StoreError(f"store {path}: shard {shard['file']} is missing") from None
    except (OSError, ValueError) as err:
        raise StoreError(f"store {path}: shard {shard['file']} is unreadable: {err}") from None
    if header is None:
        raise StoreError(f"store {path}: shard {shard['file']} has no safetensors header")
    want = {"features": ([shard["rows"], manifest["D"]], manifest["dtype"]),
            "logits": ([shard["rows"], manifest["C"]], manifest["dtype"]),
            "labels": ([shard["rows"]], "int64"), "index": ([shard["rows"]], "int64")}
    for name, (shape, dtype) in want.items():
        info = header.get(name)
        got = None if info is None else (info["shape"],
                                         dtype_name(SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"])))
        if got != (shape, dtype):
            raise StoreError(f"store {path}: shard {shard['file']} holds {name} as {got}, but the manifest "
                             f"(D={manifest['D']}, C={manifest['C']}, {manifest['dtype']}, "
                             f"rows={shard['rows']}) says {(shape, dtype)}: the manifest is from another store")
    if size != shard["bytes"]:
        raise StoreError(f"store {path}: shard {shard['file']} has {size} bytes, the manifest says "
                         f"{shard['bytes']} (truncated or replaced)")


def read_json(file: Path, missing: str):
    """The JSON in `file`; a StoreError `missing` when there is none, or naming why it cannot be read."""
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise StoreError(missing) from None
    except (OSError, ValueError) as err:
        raise StoreError(f"{file} is not a readable store manifest: {err}") from None


def read_manifest(path: Path) -> dict:
    """The manifest of the store at `path`, its fields' types checked; a StoreError names what is wrong."""
    file = path / MANIFEST
    manifest = read_json(file, f"{path} is not a store: {MANIFEST} is missing")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{file} is not an exemplar store manifest (format is "
                         f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise StoreError(f"{file}: store format version {version!r} was written by a newer exemplar; this one "
                         f"reads versions up to {VERSION}: upgrade exemplar")
    for key, kind in (("D", int), ("C", int), ("dtype", str), ("shard_rows", int), ("shards", list),
                      ("complete", bool), ("source", dict)):
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool) != (kind is bool):
            raise StoreError(f"{file}: field {key!r} is missing or not a {kind.__name__}")
    for key, low in (("D", 0), ("C", 2), ("shard_rows", 1)):
        if manifest[key] < low:
            raise StoreError(f"{file}: field {key!r} must be an integer >= {low}, got {manifest[key]}")
    if manifest["dtype"] not in DTYPES:
        raise StoreError(f"{file}: field 'dtype' is {manifest['dtype']!r}, expected one of {tuple(DTYPES)}")
    for i, shard in enumerate(manifest["shards"]):
        _check_shard_entry(file, i, shard)
    _check_content(file, manifest)
    return manifest


_DIGEST = re.compile(r"[0-9a-f]{16}")


def _check_content(file: Path, manifest: dict) -> None:
    """The content digests (content.py), read like user input: a chunk digest
    for every complete chunk of the rows written, and the fingerprint once
    complete. Both are optional: stores written before them are read for them."""
    chunks = manifest.get("content_chunks")
    rows = sum(shard["rows"] for shard in manifest["shards"])
    if chunks is not None and (not isinstance(chunks, list) or len(chunks) != rows // CONTENT_ROWS
                               or not all(isinstance(c, str) and _DIGEST.fullmatch(c) for c in chunks)):
        raise StoreError(f"{file}: field 'content_chunks' must list {rows // CONTENT_ROWS} digests of 16 hex digits "
                         f"(one per {CONTENT_ROWS} of the {rows} rows), got "
                         f"{len(chunks) if isinstance(chunks, list) else type(chunks).__name__}")
    content = manifest.get("content")
    if content is not None and not (isinstance(content, str) and _DIGEST.fullmatch(content)):
        raise StoreError(f"{file}: field 'content' must be 16 hex digits, got {content!r}")


_SHARD_NAME = re.compile(r"shard-\d{5}\.safetensors")


def _check_shard_entry(file: Path, i: int, shard) -> None:
    """One entry of the manifest's shard list, read like user input."""
    where = f"{file}: field 'shards[{i}]"
    if not isinstance(shard, dict):
        raise StoreError(f"{where}' must be an object with file, rows, bytes, crc32, max_sq_norm; "
                         f"got {type(shard).__name__}")
    name = shard.get("file")
    if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name):
        raise StoreError(f"{where}.file' must be a shard file name like 'shard-00000.safetensors', got {name!r}")
    for key, low in (("rows", 1), ("bytes", 8)):
        value = shard.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise StoreError(f"{where}.{key}' must be an integer >= {low}, got {value!r}")
    crc = shard.get("crc32")
    if not isinstance(crc, str) or not re.fullmatch(r"[0-9a-f]{8}", crc):
        raise StoreError(f"{where}.crc32' must be 8 lowercase hex digits, got {crc!r}")
    sq = shard.get("max_sq_norm")
    if isinstance(sq, bool) or not isinstance(sq, (int, float)) or math.isnan(sq) or sq < 0:
        raise StoreError(f"{where}.max_sq_norm' must be a number >= 0, got {sq!r}")
