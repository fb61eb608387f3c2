"""An on-disk store of per-layer training gradients for whole-network
attribution (docs/design.md §11), collected once and queried many times, by
one process or by the ranks of a process group (each writing the rows of its
own batches):

    manifest.json                  format, version, source (what wrote it: the model's digest, the layers and
                                   their projections, the loader's data and order), dtype, shard_rows, world
                                   (the ranks writing it), layers, and once complete, per shard: file, rank,
                                   rows, its first row's position, SHA-256 of its tensors
    part-<r>.json                  while rank r writes: its complete shards (what a rerun continues from)
    shard-<r>-00000.safetensors    labels (n,), positions (n,) (the rows' places in the training set) and per
                                   layer j "j.delta" (n, k_out) + "j.a" (n, k_in), or "j.g" (n, k_out, k_in);
                                   its metadata repeats its rows and SHA-256
    fits/<tag>/                    what NetworkExplainers fitted on it (per-layer curvatures, normalisers),
                                   keyed by the settings and the store's content (storage/fitcache.py)

Shards are written whole through write_atomic, then the rank's part file the
same way, so a writer killed at any moment leaves a store that continues
from each rank's last complete shard; when every rank is done the parts are
joined into the manifest (identical bytes from every rank). A complete store
is read by any number of ranks, rank r taking shards r, r + world, ....
Everything read is checked like user input (the manifest's fields, each
shard's tensors against its SHA-256, the layers' shapes and its positions);
a store another model, projection, loader order or number of ranks began is
refused unless overwrite=True. Errors are StoreErrors naming the file and
the field."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .manifest import DTYPES, StoreError, dtype_name, manifest_bytes, read_json
from .saved import digest, first_difference, read, tensors_digest, write, write_atomic

FORMAT = "exemplar-gradients"
VERSION = 2
MANIFEST = "manifest.json"
DEFAULT_SHARD_ROWS = 8192


def _int(v, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _layer_keys(j: int, layer: dict) -> dict[str, tuple]:
    """Tensor name -> shape (without rows) of layer j of the manifest."""
    if layer["factored"]:
        return {f"{j}.delta": (layer["k_out"],), f"{j}.a": (layer["k_in"],)}
    return {f"{j}.g": (layer["k_out"], layer["k_in"])}


def _check_shards(file: Path, shards, shard_rows: int, world: int) -> list[dict]:
    """A manifest's or part file's shard entries, each checked."""
    if not isinstance(shards, list):
        raise StoreError(f"{file}: field 'shards' is missing or invalid")
    for i, s in enumerate(shards):
        if not (isinstance(s, dict) and _int(s.get("rank")) and s["rank"] < world and _int(s.get("rows"), 1)
                and s["rows"] <= shard_rows and _int(s.get("first")) and isinstance(s.get("sha256"), str)
                and isinstance(s.get("file"), str) and s["file"].startswith(f"shard-{s['rank']}-")
                and s["file"].endswith(".safetensors") and "/" not in s["file"]):
            raise StoreError(f"{file}: shard entry {i} is invalid")
    return shards


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    m = read_json(file, f"{path} is not a gradient store (no {MANIFEST})")
    if isinstance(m, dict) and m.get("format") == FORMAT and m.get("version") == 1:
        raise StoreError(f"{file}: a gradient store of version 1 (written by an earlier exemplar, without the "
                         "rows' positions); collect it again: pass overwrite=True, or delete the folder")
    checks = [("format", lambda v: v == FORMAT), ("version", lambda v: v == VERSION),
              ("source", lambda v: isinstance(v, dict)), ("dtype", lambda v: v in DTYPES),
              ("complete", lambda v: isinstance(v, bool)), ("shard_rows", lambda v: _int(v, 1)),
              ("world", lambda v: _int(v, 1)), ("shards", lambda v: isinstance(v, list)),
              ("layers", lambda v: isinstance(v, list) and all(
                  isinstance(x, dict) and isinstance(x.get("factored"), bool)
                  and all(_int(x.get(k), 1) for k in ("k_out", "k_in")) for x in v))]
    for key, ok in checks:
        if not isinstance(m, dict) or key not in m or not ok(m[key]):
            raise StoreError(f"{file}: field {key!r} is missing or invalid (not a gradient store manifest of "
                             f"version {VERSION})")
    _check_shards(file, m["shards"], m["shard_rows"], m["world"])
    if m["complete"]:
        if not m["shards"] or not m["layers"]:
            raise StoreError(f"{file}: a complete store with no shards or no layers")
        firsts = [s["first"] for s in m["shards"]]
        if firsts != sorted(set(firsts)) or firsts[-1] >= sum(s["rows"] for s in m["shards"]):
            raise StoreError(f"{file}: the shards' first positions {firsts[:8]} are not distinct, in order and "
                             "within the store's rows")
    return m


def _read_part(path: Path, rank: int, manifest: dict) -> dict:
    """Rank `rank`'s part file (its complete shards while writing), checked; empty when absent."""
    file = path / f"part-{rank}.json"
    if not file.exists():
        return {"layers": [], "shards": [], "done": False}
    part = read_json(file, f"{file} is missing")
    if not (isinstance(part, dict) and isinstance(part.get("layers"), list) and isinstance(part.get("done"), bool)):
        raise StoreError(f"{file}: not a part file of this gradient store (fields 'layers', 'shards', 'done')")
    _check_shards(file, part.get("shards"), manifest["shard_rows"], manifest["world"])
    if any(s["rank"] != rank for s in part["shards"]):
        raise StoreError(f"{file}: holds shards of another rank")
    return part


def _joined_shards(path: Path, manifest: dict) -> list[dict]:
    """Every rank's complete shards so far, in the order of their rows."""
    if manifest["complete"]:
        return manifest["shards"]
    shards = [s for r in range(manifest["world"]) for s in _read_part(path, r, manifest)["shards"]]
    return sorted(shards, key=lambda s: s["first"])


class GradientStore:
    """A gradient store opened for reading (complete or not).

    Attributes:
        manifest: the checked manifest; layers: its per-layer entries;
        dtype: the gradients' dtype; shards: the complete shards' entries,
        in the order of their rows; sizes: their rows."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        self.layers, self.dtype = self.manifest["layers"], DTYPES[self.manifest["dtype"]]
        self.shards = _joined_shards(self.path, self.manifest)
        self.sizes = [s["rows"] for s in self.shards]

    def __len__(self) -> int:
        return sum(self.sizes)

    def fingerprint(self) -> str:
        """Names the store's content: its source, layers, dtype and every shard's rows, place and SHA-256."""
        m = self.manifest
        return digest(json.dumps([m["source"], m["layers"], m["dtype"],
                                  [(s["rows"], s["first"], s["sha256"]) for s in self.shards]],
                                 sort_keys=True))[:16]

    def shard(self, i: int) -> dict[str, torch.Tensor]:
        """Shard i's tensors, checked against the manifest (SHA-256, rows, shapes, dtype, positions)."""
        entry = self.shards[i]
        file = self.path / entry["file"]
        try:
            tensors, meta = read(file, FORMAT, ("rows", "sha256"))
        except (OSError, ValueError) as err:
            raise StoreError(f"gradient store {self.path}: shard {entry['file']} is unreadable ({err})") from None
        if meta["rows"] != entry["rows"] or meta["sha256"] != entry["sha256"] \
                or tensors_digest(tensors) != entry["sha256"]:
            raise StoreError(f"gradient store {self.path}: shard {entry['file']} does not match the manifest "
                             "(damaged or replaced); delete the store to collect it again")
        want = {"labels": ((), torch.int64), "positions": ((), torch.int64)}
        for j, layer in enumerate(self.layers):
            want.update({k: (shape, self.dtype) for k, shape in _layer_keys(j, layer).items()})
        for key, (shape, dtype) in want.items():
            t = tensors.get(key)
            if t is None or tuple(t.shape) != (entry["rows"], *shape) or t.dtype != dtype:
                raise StoreError(f"gradient store {self.path}: shard {entry['file']} holds {key} as "
                                 f"{None if t is None else (tuple(t.shape), t.dtype)}, expected "
                                 f"{((entry['rows'], *shape), dtype)}")
        if set(tensors) != set(want):
            raise StoreError(f"gradient store {self.path}: shard {entry['file']} holds unexpected tensors "
                             f"{sorted(set(tensors) - set(want))}")
        positions = tensors["positions"]
        if int(positions[0]) != entry["first"] or int(positions[-1]) >= len(self) \
                or not bool((positions[1:] > positions[:-1]).all()):
            raise StoreError(f"gradient store {self.path}: shard {entry['file']} holds positions that are not "
                             f"increasing from {entry['first']} within the store's {len(self)} rows")
        return tensors


def prepare(path, source: dict, dtype: torch.dtype, shard_rows: int = DEFAULT_SHARD_ROWS,
            overwrite: bool = False, world: int = 1) -> None:
    """Makes `path` a gradient store for `source` written by `world` ranks
    (one process calls it, before any writer): a fresh folder gets a manifest,
    a store this source began is left to be continued or read, and one that
    another source, dtype, shard_rows or world began is refused unless
    overwrite=True (then deleted)."""
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
        raise ValueError(f"shard_rows must be an integer >= 1, got {shard_rows!r}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StoreError(f"store={str(path)!r} is a file; a gradient store is a folder")
    fresh = {"format": FORMAT, "version": VERSION, "source": json.loads(json.dumps(source)), "layers": [],
             "dtype": dtype_name(dtype), "shard_rows": shard_rows, "world": world, "shards": [], "complete": False}
    if (path / MANIFEST).exists():
        try:
            held = _read_manifest(path)
        except StoreError:
            if not overwrite:
                raise
            held = None
        fields = ("source", "dtype", "shard_rows") + (() if held is not None and held["complete"] else ("world",))
        key = "version" if held is None else first_difference({k: held[k] for k in fields},
                                                             {k: fresh[k] for k in fields})
        if key is None:
            return
        if not overwrite:
            detail = first_difference(held["source"], fresh["source"]) if key == "source" else None
            raise StoreError(f"gradient store {path} was begun by another {key}"
                             + (f" ({detail!r} differs)" if detail else "")
                             + (f" ({held['world']} ranks, now {world})" if key == "world" else "")
                             + "; pass overwrite=True to replace it, or use another path")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / MANIFEST, manifest_bytes(fresh))


class GradientStoreWriter:
    """Writes rank `rank`'s rows into the store `prepare` made at `path`,
    shard by shard, continuing from that rank's last complete shard.
    `rows_done`: this rank's rows already written; `layers`: what they are
    ({"k_out", "k_in", "factored"} each), recorded with the first rows."""

    def __init__(self, path, rank: int = 0):
        self.path, self.rank = Path(path), rank
        self.manifest = _read_manifest(self.path)
        self.part = _read_part(self.path, rank, self.manifest) if not self.manifest["complete"] else None
        self.pending: list[dict[str, torch.Tensor]] = []

    @property
    def complete(self) -> bool:
        """Whether the whole store was finished."""
        return self.manifest["complete"]

    @property
    def rows_done(self) -> int:
        """This rank's rows already in complete shards."""
        return sum(s["rows"] for s in self.part["shards"])

    @property
    def layers(self) -> list[dict]:
        """The recorded layers (empty before this rank's first rows)."""
        return self.manifest["layers"] if self.complete else self.part["layers"]

    def add(self, tensors: dict[str, torch.Tensor], layers: list[dict]) -> None:
        """Appends rows (labels, positions and each layer's tensors, named as in
        a shard); full shards go to disk. layers: what the rows are, as recorded."""
        if not self.part["layers"]:
            self.part["layers"] = layers
        elif self.part["layers"] != layers:
            raise StoreError(f"gradient store {self.path} holds layers {self.part['layers']}, these rows are "
                             f"{layers}: every batch must have the same shape")
        self.pending.append({k: v.detach().cpu() for k, v in tensors.items()})
        while sum(len(p["labels"]) for p in self.pending) >= self.manifest["shard_rows"]:
            self._flush(self.manifest["shard_rows"])

    def close(self) -> None:
        """Writes this rank's last (partial) shard and marks its part done."""
        rows = sum(len(p["labels"]) for p in self.pending)
        if rows:
            self._flush(rows)
        self.part["done"] = True
        write_atomic(self.path / f"part-{self.rank}.json", manifest_bytes(self.part))

    def _flush(self, rows: int) -> None:
        joined = {k: torch.cat([p[k] for p in self.pending]) for k in self.pending[0]}
        shard = {k: v[:rows].contiguous() for k, v in joined.items()}
        rest = {k: v[rows:] for k, v in joined.items()}
        self.pending = [rest] if len(rest["labels"]) else []
        entry = {"file": f"shard-{self.rank}-{len(self.part['shards']):05d}.safetensors", "rank": self.rank,
                 "rows": rows, "first": int(shard["positions"][0]), "sha256": tensors_digest(shard)}
        write(self.path / entry["file"], shard, {"format": FORMAT, "rows": rows, "sha256": entry["sha256"]})
        self.part["shards"].append(entry)
        write_atomic(self.path / f"part-{self.rank}.json", manifest_bytes(self.part))


def finish(path) -> GradientStore:
    """Joins every rank's part into the manifest, marks the store complete
    and opens it (every rank may call it: they write the same bytes); a store
    whose ranks have not all finished is refused."""
    path = Path(path)
    manifest = _read_manifest(path)
    if not manifest["complete"]:
        parts = [_read_part(path, r, manifest) for r in range(manifest["world"])]
        unfinished = [r for r, part in enumerate(parts) if not part["done"]]
        if unfinished:
            raise StoreError(f"gradient store {path}: ranks {unfinished} have not finished writing")
        layers = [part["layers"] for part in parts if part["shards"]]
        if not layers:
            raise ValueError("no training rows were written")
        if any(x != layers[0] for x in layers):
            raise StoreError(f"gradient store {path}: the ranks wrote layers of different shapes")
        manifest.update(layers=layers[0], shards=_joined_shards(path, manifest), complete=True)
        write_atomic(path / MANIFEST, manifest_bytes(manifest))
    return GradientStore(path)
