"""An on-disk training store: what the last layer saw and said, in shards.

A store is a folder:

    manifest.json               format, version, D, C, dtype, shard_rows, source,
                                and per shard: file, rows, bytes, CRC-32, the
                                largest squared feature norm; the content's chunk
                                digests (content.py) as they are written, and
                                "complete" and the content fingerprint once written
    shard-00000.safetensors     features (n, D), logits (n, C), labels (n,) int64,
                                index (n,) int64: the examples' positions in the dataset
    fits/<tag>/                 what Attributors fitted on it (curvature, refits,
                                per-shard normalisers), keyed by what they depend on:
                                the settings, this store's content and the layer;
                                every file carries a SHA-256 of its tensors

Shards are written whole to a temporary file and renamed, then the manifest is
rewritten the same way, so a writer killed at any moment leaves a store that
continues from its last complete shard; rerun with the same arguments, it ends
byte-identical to an uninterrupted run. Reads go through the C++ ShardReader
(csrc/io/), one shard ahead of the consumer, checking sizes and CRC-32s."""
from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import torch
from safetensors.torch import save as save_bytes

from .. import _C
from ..data import FLOAT_DTYPES, LastLayerData, check_labels_in_range, check_magnitude, largest_sq_norm
from .blocks import Block, Blocks, TrainingSet
from .content import ContentDigest
from .fitcache import StoreColumns
from .manifest import (
    DEFAULT_SHARD_ROWS,
    DTYPES,
    FORMAT,
    MANIFEST,
    SAFETENSORS_DTYPES,
    VERSION,
    StoreError,
    check_shard,
    dtype_name,
    manifest_bytes,
    read_manifest,
)
from .saved import digest, first_difference, write_atomic


class Store(TrainingSet):
    """A complete store opened for reading, and a TrainingSet (blocks.py) an
    Attributor streams.

    Arguments:
        path: the store's folder (manifest.json and shards, checked on opening).
        device: where its shards are delivered (pinned host memory and
            non-blocking copies for a GPU)."""

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
        self.dtype = DTYPES[m["dtype"]]
        self.sizes = [s["rows"] for s in m["shards"]]
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.max_rows = max(self.sizes, default=0)
        for shard in m["shards"]:
            check_shard(self.path, m, shard)

    def __len__(self) -> int:
        return sum(self.sizes)

    def __repr__(self) -> str:
        return (f"Store({str(self.path)!r}, N={len(self)}, D={self.num_features}, C={self.num_classes}, "
                f"{dtype_name(self.dtype)}, {len(self.sizes)} shards)")

    def fingerprint(self) -> str:
        """Names this store's rows (content.py): the same as memory's, or another
        store's of any shard size, holding the same rows. Recorded by the
        writer; a store written before it was recorded is read once for it."""
        if "content" not in self.manifest:
            content = ContentDigest()
            for block in self.blocks().read(range(len(self.sizes))):
                content.add(block.features, block.logits, block.labels)
            self.manifest["content"] = content.fingerprint(self.num_features, self.num_classes, self.dtype)
        return self.manifest["content"]

    def describe(self) -> str:
        """The store's path and content fingerprint, for messages."""
        return f"{self.path} (content {self.fingerprint()})"

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

    def columns(self, identity) -> "StoreColumns":
        """Per-example fitted values and fits for `identity` (its .tag names the
        folder fits/<tag>/, its .meta is recorded and checked), beside the shards
        and read from there by the next Attributor with the same identity."""
        return StoreColumns(self, identity)

    def load(self) -> LastLayerData:
        """The whole store in memory (for stores that fit)."""
        blocks = list(self.blocks().read(range(len(self.sizes))))
        return LastLayerData(torch.cat([b.features for b in blocks]), torch.cat([b.logits for b in blocks]),
                             torch.cat([b.labels for b in blocks]))

    def index(self) -> torch.Tensor:
        """(N,) int64: each row's position in the dataset it was collected from."""
        return torch.cat([_parse(b)["index"] for b in self._reader(range(len(self.sizes)))])

    def _reader(self, indices):
        return _read_shards(self.path, [self.manifest["shards"][i] for i in indices], self.device.type == "cuda")


def _read_shards(path: Path, shards: list[dict], pinned: bool = False):
    """Yields each shard's bytes (uint8), read ahead by the C++ ShardReader,
    its size and CRC-32 checked against the manifest's entry."""
    files = [(str(path / s["file"]), s["bytes"], int(s["crc32"], 16)) for s in shards]
    reader = _C.ShardReader(files, pinned=pinned, depth=1)
    for _ in shards:
        try:
            yield reader.next()
        except RuntimeError as err:
            raise StoreError(f"store {path}: {err}") from None


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
            out[name] = raw[8 + n + start:8 + n + end].view(SAFETENSORS_DTYPES[info["dtype"]]).view(info["shape"])
    return out


class StoreWriter:
    """Appends rows to a store, one shard in memory at a time; reopening a
    store that was interrupted continues after its last complete shard.
    `source` names what the rows came from (the data's content, or the model,
    layer and loader order that produce them): a store started or finished
    from another source is refused and left as it is, or with overwrite=True
    removed and written anew."""

    def __init__(self, path: str | os.PathLike, D: int, C: int, dtype: torch.dtype,
                 shard_rows: int = DEFAULT_SHARD_ROWS, source: dict | None = None, overwrite: bool = False):
        if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
            raise ValueError(f"shard_rows must be an integer >= 1, got {shard_rows!r}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"features must be float32 or float64 to store, got {dtype}")
        self.path = Path(path)
        fresh = {"format": FORMAT, "version": VERSION, "D": D, "C": C, "dtype": dtype_name(dtype),
                 "shard_rows": shard_rows, "source": source or {}, "shards": [], "complete": False}
        if not isinstance(overwrite, bool):
            raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
        resuming = (self.path / MANIFEST).exists()
        if resuming:
            self.manifest = read_manifest(self.path)
            differs = _first_difference(self.manifest, fresh)
            if differs is not None and not overwrite:
                key, held, here = differs
                raise StoreError(f"store {self.path} holds other data: {key} is {held!r} there, {here!r} here; "
                                 "write to another path, or pass overwrite=True to replace it (nothing was "
                                 "changed)")
            if differs is not None:
                _remove_store(self.path)
                resuming = False
        if resuming:
            for shard in self.manifest["shards"]:
                check_shard(self.path, self.manifest, shard)
            for stale in self.path.glob("*.tmp"):  # what a killed writer was writing
                stale.unlink()
        else:
            if self.path.exists() and any(self.path.iterdir()):
                raise StoreError(f"{self.path} exists and is not a store: refusing to write into it")
            self.path.mkdir(parents=True, exist_ok=True)
            self.manifest = fresh
            write_atomic(self.path / MANIFEST, manifest_bytes(fresh))
        self.rows_done = sum(s["rows"] for s in self.manifest["shards"])
        self._pending: list[tuple[torch.Tensor, ...]] = []
        self._pending_rows = 0
        self.content = self._content_so_far()

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
        if dtype_name(features.dtype) != m["dtype"]:
            raise StoreError(f"store {self.path} holds {m['dtype']}; got {features.dtype}")
        LastLayerData(features, logits, labels)  # finite, shapes agree, labels in [0, C)
        check_labels_in_range(labels, m["C"])
        self._pending.append(tuple(x.detach().cpu() for x in (features, logits, labels.long(), index.long())))
        self._pending_rows += features.shape[0]
        while self._pending_rows >= m["shard_rows"]:
            self._flush(m["shard_rows"])

    def _content_so_far(self) -> ContentDigest:
        """The content digest of the rows in the store: the manifest's complete
        chunks and the rows after them, read back from their shards (a resumed
        writer; a store from before chunks were recorded is read whole)."""
        content = ContentDigest(self.manifest.get("content_chunks", []))
        covered, start, after = content.rows, 0, []
        for shard in self.manifest["shards"]:
            if start + shard["rows"] > covered:
                after.append((max(covered - start, 0), shard))
            start += shard["rows"]
        for (skip, _), raw in zip(after, _read_shards(self.path, [shard for _, shard in after])):
            t = _parse(raw)
            content.add(t["features"][skip:], t["logits"][skip:], t["labels"][skip:])
        return content

    def finish(self) -> "Store":
        """Writes the last partial shard, marks the store complete and opens it."""
        if not self.complete:
            if self._pending_rows:
                self._flush(self._pending_rows)
            if not self.manifest["shards"]:
                raise StoreError(f"store {self.path}: no rows were written")
            self.manifest["complete"] = True
            self.manifest["content"] = self.content.fingerprint(self.manifest["D"], self.manifest["C"],
                                                                DTYPES[self.manifest["dtype"]])
            write_atomic(self.path / MANIFEST, manifest_bytes(self.manifest))
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
        self.content.add(features, logits, labels)
        self.manifest["content_chunks"] = list(self.content.chunks)
        self.manifest["shards"].append({"file": name, "rows": rows, "bytes": len(data),
                                        "crc32": f"{zlib.crc32(data):08x}", "max_sq_norm": sq})
        write_atomic(self.path / MANIFEST, manifest_bytes(self.manifest))
        self.rows_done += rows


def _first_difference(held: dict, fresh: dict):
    """(field, held value, new value) of the first setting that differs, source fields by name, or None."""
    for key in ("D", "C", "dtype", "shard_rows"):
        if held.get(key) != fresh[key]:
            return key, held.get(key), fresh[key]
    key = first_difference(held["source"], fresh["source"])
    return None if key is None else (f"source.{key}", held["source"].get(key), fresh["source"].get(key))


def _remove_store(path: Path) -> None:
    """Removes what a store consists of (and nothing else) from `path`."""
    for name in [MANIFEST, *(p.name for p in path.glob("shard-*.safetensors")), *(p.name for p in path.glob(".*.tmp"))]:
        (path / name).unlink(missing_ok=True)
    shutil.rmtree(path / "fits", ignore_errors=True)


def write_store(data: LastLayerData, path: str | os.PathLike, shard_rows: int = DEFAULT_SHARD_ROWS,
                source: dict | None = None, overwrite: bool = False) -> Store:
    """Writes in-memory training data to a store on disk.

    Arguments:
        data: a LastLayerData with labels.
        path: the store's folder: new, or holding an interrupted write of the
            same data (finished from its last complete shard), or a complete
            store of the same data (reused as it is).
        shard_rows: rows per shard.
        source: what the rows came from, recorded in the manifest (default:
            a digest of the data's content).
        overwrite: replace a store of other data at `path` (refused otherwise,
            nothing changed).

    Returns:
        The complete Store."""
    if not isinstance(data, LastLayerData) or data.labels is None:
        raise ValueError("write_store needs a LastLayerData with labels")
    content = digest(data.features, data.logits, data.labels)[:16]
    writer = StoreWriter(path, data.num_features, data.num_classes, data.dtype, shard_rows,
                         source or {"from": "tensors", "rows": len(data), "content": content}, overwrite)
    start = writer.rows_done
    if not writer.complete:
        for s in range(start, len(data), shard_rows):
            e = min(s + shard_rows, len(data))
            writer.add(data.features[s:e], data.logits[s:e], data.labels[s:e], torch.arange(s, e))
    return writer.finish()


