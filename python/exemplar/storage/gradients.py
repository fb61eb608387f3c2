"""An on-disk store of per-layer training gradients for whole-network
attribution (docs/design.md §11), collected once and queried many times:

    manifest.json             format, version, source (what wrote it: the model's digest, the layers and
                              their projections, the loader's order), dtype, shard_rows, and per shard:
                              file, rows, SHA-256 of its tensors; "complete" once written
    shard-00000.safetensors   labels (n,) and per layer j "j.delta" (n, k_out) + "j.a" (n, k_in), or "j.g"
                              (n, k_out, k_in); its metadata repeats its rows and SHA-256
    fits/<tag>.safetensors    fitted per-layer curvatures, keyed by the settings and the store's content

Shards are written whole through write_atomic, then the manifest the same
way, so a writer killed at any moment leaves a store that continues from its
last complete shard. Everything read is checked like user input (the
manifest's fields, each shard's tensors against its SHA-256 and the layers'
shapes); a store another model, projection or loader order wrote is refused
unless overwrite=True. Errors are StoreErrors naming the file and the field."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .manifest import DTYPES, StoreError, dtype_name, manifest_bytes, read_json
from .saved import digest, first_difference, read, tensors_digest, write, write_atomic

FORMAT = "exemplar-gradients"
FIT_FORMAT = "exemplar-gradients-fit"
VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_ROWS = 8192


def _layer_keys(j: int, layer: dict) -> dict[str, tuple]:
    """Tensor name -> shape (without rows) of layer j of the manifest."""
    if layer["factored"]:
        return {f"{j}.delta": (layer["k_out"],), f"{j}.a": (layer["k_in"],)}
    return {f"{j}.g": (layer["k_out"], layer["k_in"])}


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    m = read_json(file, f"{path} is not a gradient store (no {MANIFEST})")
    checks = [("format", lambda v: v == FORMAT), ("version", lambda v: v == VERSION),
              ("source", lambda v: isinstance(v, dict)), ("dtype", lambda v: v in DTYPES),
              ("complete", lambda v: isinstance(v, bool)),
              ("shard_rows", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
              ("shards", lambda v: isinstance(v, list)),
              ("layers", lambda v: isinstance(v, list) and all(
                  isinstance(x, dict) and isinstance(x.get("factored"), bool)
                  and all(isinstance(x.get(k), int) and x[k] >= 1 for k in ("k_out", "k_in")) for x in v))]
    for key, ok in checks:
        if not isinstance(m, dict) or key not in m or not ok(m[key]):
            raise StoreError(f"{file}: field {key!r} is missing or invalid (not a gradient store manifest of "
                             f"version {VERSION})")
    if m["shards"] and not m["layers"]:
        raise StoreError(f"{file}: field 'layers' is empty but the store has shards")
    for i, s in enumerate(m["shards"]):
        if not (isinstance(s, dict) and s.get("file") == f"shard-{i:05d}.safetensors"
                and isinstance(s.get("rows"), int) and 1 <= s["rows"] <= m["shard_rows"]
                and isinstance(s.get("sha256"), str)):
            raise StoreError(f"{file}: shard entry {i} is invalid")
    return m


class GradientStore:
    """A gradient store opened for reading (complete or not).

    Attributes:
        manifest: the checked manifest; layers: its per-layer entries;
        dtype: the gradients' dtype."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        self.layers, self.dtype = self.manifest["layers"], DTYPES[self.manifest["dtype"]]
        self.sizes = [s["rows"] for s in self.manifest["shards"]]

    def __len__(self) -> int:
        return sum(self.sizes)

    def fingerprint(self) -> str:
        """Names the store's content: its source, layers, dtype and every shard's rows and SHA-256."""
        m = self.manifest
        return digest(json.dumps([m["source"], m["layers"], m["dtype"],
                                  [(s["rows"], s["sha256"]) for s in m["shards"]]], sort_keys=True))[:16]

    def shard(self, i: int) -> dict[str, torch.Tensor]:
        """Shard i's tensors, checked against the manifest (SHA-256, rows, shapes, dtype)."""
        entry = self.manifest["shards"][i]
        file = self.path / entry["file"]
        try:
            tensors, meta = read(file, FORMAT, ("rows", "sha256"))
        except (OSError, ValueError) as err:
            raise StoreError(f"gradient store {self.path}: shard {entry['file']} is unreadable ({err})") from None
        if meta["rows"] != entry["rows"] or meta["sha256"] != entry["sha256"] \
                or tensors_digest(tensors) != entry["sha256"]:
            raise StoreError(f"gradient store {self.path}: shard {entry['file']} does not match the manifest "
                             "(damaged or replaced); delete the store to collect it again")
        want = {"labels": ((), torch.int64)}
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
        return tensors

    def load_fit(self, tag: str, identity: dict) -> dict[str, torch.Tensor] | None:
        """A fit saved under `tag`, checked (its identity and SHA-256), or None."""
        file = self.path / "fits" / f"{tag}.safetensors"
        if not file.exists():
            return None
        try:
            tensors, meta = read(file, FIT_FORMAT, ("identity", "sha256"))
        except (OSError, ValueError) as err:
            raise StoreError(f"{file} is unreadable ({err}); delete it to recompute") from None
        if meta["identity"] != identity or meta["sha256"] != tensors_digest(tensors):
            raise StoreError(f"{file} does not belong to this store and these settings (or is damaged); "
                             "delete it to recompute")
        return tensors

    def save_fit(self, tag: str, identity: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Writes a fit under `tag` (atomically), recording its identity and SHA-256."""
        (self.path / "fits").mkdir(exist_ok=True)
        write(self.path / "fits" / f"{tag}.safetensors", tensors,
              {"format": FIT_FORMAT, "identity": identity, "sha256": tensors_digest(tensors)})


class GradientStoreWriter:
    """Writes a gradient store shard by shard, or continues one that the same
    source (model, layers, projections, loader order) began.

    Arguments:
        path: the store's folder.
        source: what writes it (recorded; must equal a partial store's to continue it).
        dtype, shard_rows: of the gradients.
        overwrite: replace a store another source wrote.

    The layers ({"k_out", "k_in", "factored"} each) are recorded with the first rows added."""

    def __init__(self, path, source: dict, dtype: torch.dtype,
                 shard_rows: int = DEFAULT_SHARD_ROWS, overwrite: bool = False):
        if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
            raise ValueError(f"shard_rows must be an integer >= 1, got {shard_rows!r}")
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"store={str(self.path)!r} is a file; a gradient store is a folder")
        fresh = {"format": FORMAT, "version": VERSION, "source": json.loads(json.dumps(source)), "layers": [],
                 "dtype": dtype_name(dtype), "shard_rows": shard_rows, "shards": [], "complete": False}
        if (self.path / MANIFEST).exists():
            held = _read_manifest(self.path)
            key = first_difference({k: held[k] for k in ("source", "dtype", "shard_rows")},
                                   {k: fresh[k] for k in ("source", "dtype", "shard_rows")})
            if key is not None and not overwrite:
                detail = first_difference(held["source"], fresh["source"]) if key == "source" else None
                raise StoreError(f"gradient store {self.path} was written by another {key}"
                                 + (f" ({detail!r} differs)" if detail else "")
                                 + "; pass overwrite=True to replace it, or use another path")
            if key is None:
                fresh = held
            else:
                shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest = fresh
        self.pending: list[dict[str, torch.Tensor]] = []
        if not (self.path / MANIFEST).exists():
            write_atomic(self.path / MANIFEST, manifest_bytes(self.manifest))

    @property
    def rows_done(self) -> int:
        """Rows already in complete shards."""
        return sum(s["rows"] for s in self.manifest["shards"])

    @property
    def complete(self) -> bool:
        """Whether the store was finished."""
        return self.manifest["complete"]

    @property
    def layers(self) -> list[dict]:
        """The recorded layers (empty before the first rows)."""
        return self.manifest["layers"]

    def add(self, tensors: dict[str, torch.Tensor], layers: list[dict]) -> None:
        """Appends rows (labels and each layer's tensors, named as in a shard);
        full shards go to disk. layers: what the rows are, as recorded."""
        if not self.manifest["layers"]:
            self.manifest["layers"] = layers
        elif self.manifest["layers"] != layers:
            raise StoreError(f"gradient store {self.path} holds layers {self.manifest['layers']}, these rows are "
                             f"{layers}: every batch must have the same shape")
        self.pending.append({k: v.detach().cpu() for k, v in tensors.items()})
        while sum(len(p["labels"]) for p in self.pending) >= self.manifest["shard_rows"]:
            self._flush(self.manifest["shard_rows"])

    def finish(self) -> GradientStore:
        """Writes the last (partial) shard, marks the store complete and opens it."""
        rows = sum(len(p["labels"]) for p in self.pending)
        if rows:
            self._flush(rows)
        if not self.manifest["shards"]:
            raise ValueError("no training rows were written")
        self.manifest["complete"] = True
        write_atomic(self.path / MANIFEST, manifest_bytes(self.manifest))
        return GradientStore(self.path)

    def _flush(self, rows: int) -> None:
        joined = {k: torch.cat([p[k] for p in self.pending]) for k in self.pending[0]}
        shard = {k: v[:rows].contiguous() for k, v in joined.items()}
        rest = {k: v[rows:] for k, v in joined.items()}
        self.pending = [rest] if len(rest["labels"]) else []
        entry = {"file": f"shard-{len(self.manifest['shards']):05d}.safetensors", "rows": rows,
                 "sha256": tensors_digest(shard)}
        write(self.path / entry["file"], shard, {"format": FORMAT, "rows": rows, "sha256": entry["sha256"]})
        self.manifest["shards"].append(entry)
        write_atomic(self.path / MANIFEST, manifest_bytes(self.manifest))
