"""An on-disk training store: what the last layer saw and said, in shards.

A store is a folder:

    manifest.json               format, version, D, C, dtype, shard_rows, source,
                                and per shard: file, rows, bytes, CRC-32, the
                                largest squared feature norm; "complete" once written
    shard-00000.safetensors     features (n, D), logits (n, C), labels (n,) int64,
                                index (n,) int64: the examples' positions in the dataset
    fits/<settings>/            what Attributors fitted on it (curvature, refits,
                                per-shard normalisers), keyed by their settings

Shards are written whole to a temporary file and renamed, then the manifest is
rewritten the same way, so a writer killed at any moment leaves a store that
continues from its last complete shard; rerun with the same arguments, it ends
byte-identical to an uninterrupted run. Reads go through the C++ ShardReader
(csrc/io/), one shard ahead of the consumer, checking sizes and CRC-32s."""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from .. import _C
from ..data import FLOAT_DTYPES, LastLayerData, check_labels_in_range, check_magnitude, largest_sq_norm
from .blocks import Block, Blocks, Columns, TrainingSet
from .saved import write_atomic

FORMAT = "exemplar-store"
VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_ROWS = 65536
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64}


class StoreError(ValueError):
    """A store that is missing, damaged, or not the one expected."""


def _manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Store(TrainingSet):
    """A complete store opened for reading, and a TrainingSet (blocks.py) an
    Attributor streams. device: where its shards are delivered (pinned host
    memory and non-blocking copies for a GPU)."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        self.path = Path(path)
        self.device = torch.device(device)
        self.manifest = read_manifest(self.path)
        m = self.manifest
        if not m["complete"]:
            raise StoreError(f"store {self.path} is incomplete ({sum(s['rows'] for s in m['shards'])} rows in "
                             f"{len(m['shards'])} shards so far): its writer was interrupted; rerun it with "
                             "the same arguments to finish")
        self.num_features, self.num_classes = m["D"], m["C"]
        self.dtype = _DTYPES[m["dtype"]]
        self.sizes = [s["rows"] for s in m["shards"]]
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.max_rows = max(self.sizes, default=0)
        for shard in m["shards"]:
            check_shard(self.path, m, shard)

    def __len__(self) -> int:
        return sum(self.sizes)

    def __repr__(self) -> str:
        return (f"Store({str(self.path)!r}, N={len(self)}, D={self.num_features}, C={self.num_classes}, "
                f"{_dtype_name(self.dtype)}, {len(self.sizes)} shards)")

    def fingerprint(self) -> str:
        """Names this store's content: its manifest's checksums and shapes."""
        return f"{self.path.name}:{zlib.crc32(_manifest_bytes(self.manifest)):08x}"

    def largest_sq_norm(self) -> tuple[float, str]:
        """(max_i |f_i|^2, the shard holding it), from the manifest: no data read."""
        worst = max(self.manifest["shards"], key=lambda s: s["max_sq_norm"])
        return worst["max_sq_norm"], worst["file"]

    @property
    def source(self) -> "Store":
        """The store itself (what an Attributor over it holds as .train)."""
        return self

    def check_magnitude(self) -> None:
        """Refuses features whose squared norms the dtype cannot hold (from the manifest)."""
        largest, shard = self.largest_sq_norm()
        check_magnitude(f"features (shard {shard})", largest, self.dtype,
                        "write the store in float64 or rescale the features")

    def whole(self, purpose: str) -> LastLayerData:
        """Refuses: an Attributor over a store streams it and keeps its fits there."""
        raise ValueError(f"{purpose} needs the training set in memory; an Attributor over the store "
                         f"{self.path} streams its shards and keeps its fits in the store (use topk/scores, "
                         "or Store.load() for a store that fits in memory)")

    def blocks(self) -> "StoreBlocks":
        """The shards as the Attributor's row blocks, read ahead in the background."""
        return StoreBlocks(self)

    def columns(self, tag: str, writer: bool) -> "StoreColumns":
        """Per-example fitted values for the fit `tag`, kept under fits/<tag>/
        beside the shards (written only when `writer`, i.e. rank 0)."""
        return StoreColumns(self, tag, writer)

    def load(self) -> LastLayerData:
        """The whole store in memory (for stores that fit)."""
        blocks = list(self.blocks().read(range(len(self.sizes))))
        return LastLayerData(torch.cat([b.features for b in blocks]), torch.cat([b.logits for b in blocks]),
                             torch.cat([b.labels for b in blocks]))

    def index(self) -> torch.Tensor:
        """(N,) int64: each row's position in the dataset it was collected from."""
        return torch.cat([_parse(b)["index"] for b in self._reader(range(len(self.sizes)))])

    def _reader(self, indices):
        shards = [self.manifest["shards"][i] for i in indices]
        files = [(str(self.path / s["file"]), s["bytes"], int(s["crc32"], 16)) for s in shards]
        reader = _C.ShardReader(files, pinned=self.device.type == "cuda", depth=1)
        for _ in shards:
            try:
                yield reader.next()
            except RuntimeError as err:
                raise StoreError(f"store {self.path}: {err}") from None


class StoreBlocks(Blocks):
    """A store's shards as the Attributor's blocks."""

    def __init__(self, store: Store):
        self.store, self.device = store, store.device
        self.sizes, self.starts, self.max_rows = store.sizes, store.starts, store.max_rows

    def __len__(self) -> int:
        return len(self.sizes)

    def read(self, indices):
        indices = list(indices)
        for i, raw in zip(indices, self.store._reader(indices)):
            t = {k: v.to(self.device, non_blocking=True) for k, v in _parse(raw).items()}
            yield Block(i, self.starts[i], t["features"], t["logits"], t["labels"])


def _parse(raw: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views into a safetensors file's bytes (uint8, 1-D), no copies."""
    n = int.from_bytes(raw[:8].numpy().tobytes(), "little")
    header = json.loads(raw[8:8 + n].numpy().tobytes())
    out = {}
    for name, info in header.items():
        if name != "__metadata__":
            start, end = info["data_offsets"]
            out[name] = raw[8 + n + start:8 + n + end].view(_SAFETENSORS_DTYPES[info["dtype"]]).view(info["shape"])
    return out


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
                                         _dtype_name(_SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"])))
        if got != (shape, dtype):
            raise StoreError(f"store {path}: shard {shard['file']} holds {name} as {got}, but the manifest "
                             f"(D={manifest['D']}, C={manifest['C']}, {manifest['dtype']}, "
                             f"rows={shard['rows']}) says {(shape, dtype)}: the manifest is from another store")
    if size != shard["bytes"]:
        raise StoreError(f"store {path}: shard {shard['file']} has {size} bytes, the manifest says "
                         f"{shard['bytes']} (truncated or replaced)")


def read_manifest(path: Path) -> dict:
    """The manifest of the store at `path`, its fields' types checked; a StoreError names what is wrong."""
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path} is not a store: {MANIFEST} is missing") from None
    except (OSError, ValueError) as err:
        raise StoreError(f"{file} is not a readable store manifest: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{file} is not an exemplar store manifest (format is "
                         f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise StoreError(f"{file}: store format version {version!r} was written by a newer exemplar; this one "
                         f"reads versions up to {VERSION}: upgrade exemplar")
    for key, kind in (("D", int), ("C", int), ("dtype", str), ("shard_rows", int), ("shards", list),
                      ("complete", bool)):
        if not isinstance(manifest.get(key), kind):
            raise StoreError(f"{file}: field {key!r} is missing or not a {kind.__name__}")
    if manifest["dtype"] not in _DTYPES:
        raise StoreError(f"{file}: field 'dtype' is {manifest['dtype']!r}, expected one of {tuple(_DTYPES)}")
    return manifest


class StoreWriter:
    """Appends rows to a store, one shard in memory at a time; reopening a
    store that was interrupted continues after its last complete shard.
    `source` names what the rows came from (it must match on resuming)."""

    def __init__(self, path: str | os.PathLike, D: int, C: int, dtype: torch.dtype,
                 shard_rows: int = DEFAULT_SHARD_ROWS, source: dict | None = None):
        if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
            raise ValueError(f"shard_rows must be an integer >= 1, got {shard_rows!r}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"features must be float32 or float64 to store, got {dtype}")
        self.path = Path(path)
        fresh = {"format": FORMAT, "version": VERSION, "D": D, "C": C, "dtype": _dtype_name(dtype),
                 "shard_rows": shard_rows, "source": source or {}, "shards": [], "complete": False}
        if (self.path / MANIFEST).exists():
            self.manifest = read_manifest(self.path)
            for key in ("D", "C", "dtype", "shard_rows", "source"):
                if self.manifest.get(key) != fresh[key]:
                    raise StoreError(f"store {self.path} was started with {key}={self.manifest.get(key)!r}, "
                                     f"not {fresh[key]!r}: resume it with the same arguments, or write to a new "
                                     "path (nothing was changed)")
            for shard in self.manifest["shards"]:
                check_shard(self.path, self.manifest, shard)
            for stale in self.path.glob("*.tmp"):  # what a killed writer was writing
                stale.unlink()
        else:
            if self.path.exists() and any(self.path.iterdir()):
                raise StoreError(f"{self.path} exists and is not a store: refusing to write into it")
            self.path.mkdir(parents=True, exist_ok=True)
            self.manifest = fresh
            write_atomic(self.path / MANIFEST, _manifest_bytes(fresh))
        self.rows_done = sum(s["rows"] for s in self.manifest["shards"])
        self._pending: list[tuple[torch.Tensor, ...]] = []
        self._pending_rows = 0

    @property
    def complete(self) -> bool:
        """Whether the store was finished (finish() ran)."""
        return self.manifest["complete"]

    def add(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
            index: torch.Tensor) -> None:
        """Rows (n, D), (n, C), (n,), (n,) dataset positions, in order."""
        if self.complete:
            raise StoreError(f"store {self.path} is already complete")
        m = self.manifest
        if features.shape[1:] != (m["D"],) or logits.shape[1:] != (m["C"],):
            raise StoreError(f"store {self.path} holds D={m['D']}, C={m['C']}; got features "
                             f"{tuple(features.shape)} and logits {tuple(logits.shape)}")
        if _dtype_name(features.dtype) != m["dtype"]:
            raise StoreError(f"store {self.path} holds {m['dtype']}; got {features.dtype}")
        LastLayerData(features, logits, labels)  # finite, shapes agree, labels in [0, C)
        check_labels_in_range(labels, m["C"])
        self._pending.append(tuple(x.detach().cpu() for x in (features, logits, labels.long(), index.long())))
        self._pending_rows += features.shape[0]
        while self._pending_rows >= m["shard_rows"]:
            self._flush(m["shard_rows"])

    def finish(self) -> "Store":
        """Writes the last partial shard, marks the store complete and opens it."""
        if not self.complete:
            if self._pending_rows:
                self._flush(self._pending_rows)
            if not self.manifest["shards"]:
                raise StoreError(f"store {self.path}: no rows were written")
            self.manifest["complete"] = True
            write_atomic(self.path / MANIFEST, _manifest_bytes(self.manifest))
        return Store(self.path)

    def _flush(self, rows: int) -> None:
        columns = [torch.cat(c) for c in zip(*self._pending)]
        shard, rest = [c[:rows] for c in columns], [c[rows:] for c in columns]
        self._pending = [tuple(rest)] if rest[0].shape[0] else []
        self._pending_rows -= rows
        features, logits, labels, index = shard
        data = save_bytes({"features": features.contiguous(), "logits": logits.contiguous(),
                           "labels": labels.contiguous(), "index": index.contiguous()})
        name = f"shard-{len(self.manifest['shards']):05d}.safetensors"
        write_atomic(self.path / name, data)
        sq = largest_sq_norm(features)
        self.manifest["shards"].append({"file": name, "rows": rows, "bytes": len(data),
                                        "crc32": f"{zlib.crc32(data):08x}", "max_sq_norm": sq})
        write_atomic(self.path / MANIFEST, _manifest_bytes(self.manifest))
        self.rows_done += rows


def write_store(data: LastLayerData, path: str | os.PathLike, shard_rows: int = DEFAULT_SHARD_ROWS,
                source: dict | None = None) -> Store:
    """Writes in-memory training data (with labels) to a new store, or finishes
    an interrupted write of the same data."""
    if not isinstance(data, LastLayerData) or data.labels is None:
        raise ValueError("write_store needs a LastLayerData with labels")
    writer = StoreWriter(path, data.num_features, data.num_classes, data.dtype, shard_rows,
                         source or {"from": "tensors", "rows": len(data)})
    start = writer.rows_done
    if not writer.complete:
        for s in range(start, len(data), shard_rows):
            e = min(s + shard_rows, len(data))
            writer.add(data.features[s:e], data.logits[s:e], data.labels[s:e], torch.arange(s, e))
    return writer.finish()


class StoreColumns(Columns):
    """An Attributor's fits on a store, under fits/<tag>/: the curvature and
    whole-set fits in fitted.safetensors (written by rank 0), and per-example
    values one file per key and shard, so a second Attributor with the same
    settings reads them instead of recomputing."""

    def __init__(self, store: Store, tag: str, writer: bool):
        self.folder = store.path / "fits" / tag
        self.writer, self.sizes = writer, store.sizes

    def _file(self, key: str, index: int) -> Path:
        return self.folder / key / f"{index:05d}.safetensors"

    def get(self, keys, index: int):
        files = [self._file(k, index) for k in keys]
        if not all(f.exists() for f in files):
            return None
        return tuple(load_bytes(f.read_bytes())["value"] for f in files)

    def put(self, keys, index: int, values) -> None:
        for key, value in zip(keys, values):
            self._file(key, index).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self._file(key, index), save_bytes({"value": value.detach().cpu().contiguous()}))

    def whole(self) -> dict[str, torch.Tensor]:
        shards = range(len(self.sizes))
        keys = sorted(p.name for p in self.folder.glob("*") if p.is_dir())
        found = {k: [self.get((k,), i) for i in shards] for k in keys}
        return {k: torch.cat([v for (v,) in parts]) for k, parts in found.items() if all(parts)}

    def put_whole(self, key: str, value: torch.Tensor) -> None:
        for index, part in enumerate(value.split(self.sizes)):
            self.put((key,), index, (part,))

    def save_fitted(self, tensors: dict[str, torch.Tensor], kinds: dict[str, str]) -> None:
        if self.writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            data = save_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                              metadata={"kinds": json.dumps(kinds, sort_keys=True)})
            write_atomic(self.folder / "fitted.safetensors", data)

    def load_fitted(self):
        """(tensors, kinds) as save_fitted was given them, or None."""
        file = self.folder / "fitted.safetensors"
        if not file.exists():
            return None
        with safe_open(file, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["kinds"])
