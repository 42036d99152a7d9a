"""The node's weight cache: layer ranges it received, kept on disk so a restart reuses them.

Layout, under the node's cache directory:

    layers/<model sha256>/<start>-<stop>/manifest.json   config, tensors (name, type, shape,
                                                         offset, n_bytes), sha256 of the data
    layers/<model sha256>/<start>-<stop>/weights.bin     the tensors' bytes as GGUF stores them

A range arrives in a temporary folder next to the others and is renamed into place only when
every byte is there and the sha256 matches, so a crash never leaves a half range that looks
whole. Any cached range that covers a requested one serves it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT

from caravan.pipeline.gguf_file import GGUFError, TensorInfo, tensor_nbytes, tensor_view
from caravan.pipeline.model import ModelConfig, layer_tensor_shapes
from caravan.pipeline.quants import SUPPORTED_TYPES, supported_names
from caravan.pipeline.stage import LayerRange

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")


class WeightError(ValueError):
    """Weights that do not match what was declared (size, digest, names, shapes)."""


@dataclass(frozen=True)
class RangeManifest:
    """What a node is about to receive, or holds: the tensors of a layer range of one model."""

    model_sha256: str
    layers: LayerRange
    tensors: tuple[TensorInfo, ...]  # offsets relative to the start of weights.bin

    @property
    def n_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @classmethod
    def build(cls, model_sha256: str, config: ModelConfig, layers: LayerRange,
              entries: list[tuple[str, int, tuple[int, ...], int]]) -> "RangeManifest":
        """Check declared (name, type code, shape, n_bytes) entries against the config: exactly the
        range's tensors in order, supported types, the shapes the model needs, honest sizes."""
        if not _SHA256.fullmatch(model_sha256):
            raise WeightError(f"model sha256 {model_sha256!r} is not 64 lowercase hex digits")
        if layers.stop > config.n_layers:
            raise WeightError(f"layer range {layers} is past the model's {config.n_layers} layers")
        expected = {}
        for layer in layers:
            expected.update(layer_tensor_shapes(config, layer))
        names = [e[0] for e in entries]
        if names != list(expected):
            missing = [n for n in expected if n not in names]
            extra = [n for n in names if n not in expected]
            raise WeightError(
                f"tensors for layers {layers} do not match: missing {missing[:3]}, unexpected {extra[:3]}, or out of order"
            )
        tensors = []
        offset = 0
        for name, code, shape, n_bytes in entries:
            try:
                ttype = QT(code)
            except ValueError:
                raise WeightError(f"{name}: unknown tensor type {code}") from None
            if ttype not in SUPPORTED_TYPES:
                raise WeightError(f"{name}: unsupported type {ttype.name} (supported: {supported_names()})")
            if tuple(shape) != expected[name]:
                raise WeightError(f"{name}: shape {list(shape)}, expected {list(expected[name])}")
            try:
                actual = tensor_nbytes(ttype, tuple(shape), name)
            except GGUFError as exc:
                raise WeightError(str(exc)) from None
            if n_bytes != actual:
                raise WeightError(f"{name}: declared {n_bytes} bytes, a {ttype.name} tensor of shape {list(shape)} has {actual}")
            tensors.append(TensorInfo(name, ttype, tuple(shape), offset, n_bytes))
            offset += n_bytes
        return cls(model_sha256, layers, tuple(tensors))

    def to_json(self, config: ModelConfig, data_sha256: str) -> str:
        return json.dumps({
            "model_sha256": self.model_sha256,
            "layer_start": self.layers.start,
            "layer_stop": self.layers.stop,
            "config": dataclasses.asdict(config),
            "data_sha256": data_sha256,
            "tensors": [[t.name, int(t.type), list(t.shape), t.n_bytes] for t in self.tensors],
        }, indent=1)


class CachedRange:
    """A TensorSource over a cached range, memory-mapped."""

    def __init__(self, directory: Path):
        self.directory = directory
        meta = json.loads((directory / "manifest.json").read_text())
        self.config = ModelConfig(**meta["config"])
        layers = LayerRange(meta["layer_start"], meta["layer_stop"])
        entries = [(n, c, tuple(s), b) for n, c, s, b in meta["tensors"]]
        self.manifest = RangeManifest.build(meta["model_sha256"], self.config, layers, entries)
        self._tensors = {t.name: t for t in self.manifest.tensors}
        path = directory / "weights.bin"
        if path.stat().st_size != self.manifest.n_bytes:
            raise WeightError(f"{path}: {path.stat().st_size} bytes, the manifest says {self.manifest.n_bytes}")
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.manifest.n_bytes else None

    @property
    def layers(self) -> LayerRange:
        return self.manifest.layers

    def tensor_type(self, name: str) -> QT | None:
        info = self._tensors.get(name)
        return None if info is None else info.type

    def tensor_data(self, name: str) -> np.ndarray:
        return tensor_view(self._map, self._tensors[name])


class WeightCache:
    def __init__(self, root: Path):
        self.root = Path(root) / "layers"

    def find(self, model_sha256: str, layers: LayerRange) -> CachedRange | None:
        """A cached range of this model covering `layers`, the smallest if several do."""
        model_dir = self.root / model_sha256
        if not _SHA256.fullmatch(model_sha256) or not model_dir.is_dir():
            return None
        candidates = []
        for entry in model_dir.iterdir():
            m = re.fullmatch(r"(\d+)-(\d+)", entry.name)
            if m and int(m[1]) <= layers.start and layers.stop <= int(m[2]):
                candidates.append((int(m[2]) - int(m[1]), entry))
        for _, directory in sorted(candidates):
            try:
                return CachedRange(directory)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring damaged cached range %s: %s", directory, exc)
        return None

    def receive(self, manifest: RangeManifest, config: ModelConfig) -> "RangeWriter":
        return RangeWriter(self, manifest, config)


class RangeWriter:
    """Bytes of one range as they arrive: counted against the manifest, hashed, written to a
    temporary folder, and moved into the cache by finish()."""

    def __init__(self, cache: WeightCache, manifest: RangeManifest, config: ModelConfig):
        self.manifest = manifest
        self.config = config
        self.final = cache.root / manifest.model_sha256 / f"{manifest.layers.start}-{manifest.layers.stop}"
        self.tmp = cache.root / manifest.model_sha256 / f".incoming-{uuid.uuid4().hex}"
        self.tmp.mkdir(parents=True)
        self._file = open(self.tmp / "weights.bin", "wb")
        self._hash = hashlib.sha256()
        self.received = 0

    def write(self, data: bytes) -> None:
        if self.received + len(data) > self.manifest.n_bytes:
            raise WeightError(f"more than the {self.manifest.n_bytes} bytes declared for layers {self.manifest.layers}")
        self._file.write(data)
        self._hash.update(data)
        self.received += len(data)

    def finish(self, sha256: str) -> CachedRange:
        self._file.close()
        if self.received != self.manifest.n_bytes:
            raise WeightError(f"received {self.received} of the {self.manifest.n_bytes} bytes of layers {self.manifest.layers}")
        digest = self._hash.hexdigest()
        if sha256 != digest:
            raise WeightError(f"sha256 of layers {self.manifest.layers} is {digest}, the sender says {sha256}")
        (self.tmp / "manifest.json").write_text(self.manifest.to_json(self.config, digest))
        if self.final.exists():  # an older copy of the same range: the new one is verified
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        return CachedRange(self.final)

    def abort(self) -> None:
        self._file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
