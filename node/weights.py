"""The node's weight cache: the layers it received, kept on disk so a restart reuses them.

Layout, under the node's cache directory, one entry per transformer layer so that after a
re-plan a node is sent only the layers it does not have yet:

    layers/<model sha256>/<layer>/manifest.json   config, the layer's tensors (name, type,
                                                  shape, n_bytes), sha256 of its data
    layers/<model sha256>/<layer>/weights.bin     the tensors' bytes as GGUF stores them
    layers/<model sha256>/head/...                the output head's, for a node that holds the
                                                  model's last layers and the head

A push arrives in temporary folders next to the others; each layer is renamed into place only
when every byte of the push is there and its sha256 matches, so a crash never leaves a half
layer that looks whole.
"""

from __future__ import annotations

import dataclasses
import fcntl
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
from typing import IO

import numpy as np
from gguf import GGMLQuantizationType as QT

from caravan.pipeline.gguf_file import GGUFError, TensorInfo, release_pages, tensor_nbytes, tensor_view
from caravan.pipeline.model import ModelConfig, head_tensor_shapes, layer_tensor_shapes
from caravan.pipeline.quants import SUPPORTED_TYPES, packed_nbytes, supported_names
from caravan.pipeline.stage import LayerRange

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
LOCK_FILE = "node.lock"  # in the cache directory, locked by the node process that uses it
HEAD = "head"  # the output head's entry in the cache, beside the layers' numbers


class WeightError(ValueError):
    """Weights that do not match what was declared (size, digest, names, shapes)."""


@dataclass(frozen=True)
class RangeManifest:
    """What a node is about to receive, or holds: the tensors of a layer range of one model."""

    model_sha256: str
    layers: LayerRange
    tensors: tuple[TensorInfo, ...]  # offsets relative to the start of weights.bin
    head: bool = False  # the output head's tensors follow the layers'

    @property
    def n_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def packed_bytes(self) -> int:
        """The tensors' bytes as the kernels hold them, as the coordinator's plan counts them."""
        return sum(packed_nbytes(t.type, t.n_rows, t.shape[0]) if len(t.shape) == 2 else t.n_bytes
                   for t in self.tensors)

    @classmethod
    def build(cls, model_sha256: str, config: ModelConfig, layers: LayerRange,
              entries: list[tuple[str, int, tuple[int, ...], int]], head: bool = False) -> "RangeManifest":
        """Check declared (name, type code, shape, n_bytes) entries against the config: exactly the
        range's tensors in order (then the head's, with `head`: only with the model's last layer),
        supported types, the shapes the model needs, honest sizes."""
        if not _SHA256.fullmatch(model_sha256):
            raise WeightError(f"model sha256 {model_sha256!r} is not 64 lowercase hex digits")
        if layers.stop > config.n_layers:
            raise WeightError(f"layer range {layers} is past the model's {config.n_layers} layers")
        if head and layers.stop != config.n_layers:
            raise WeightError(f"the output head goes with the model's last layer; layers {layers} end before it")
        expected = {}
        for layer in layers:
            expected.update(layer_tensor_shapes(config, layer))
        if head:
            expected.update(head_tensor_shapes(config, tied=any(e[0] == "token_embd.weight" for e in entries)))
        return cls(model_sha256, layers, check_entries(expected, entries, f"layers {layers}"), head)

    def layer_tensors(self, layer: int) -> tuple[TensorInfo, ...]:
        prefix = f"blk.{layer}."
        return tuple(t for t in self.tensors if t.name.startswith(prefix))

    def head_tensors(self) -> tuple[TensorInfo, ...]:
        return tuple(t for t in self.tensors if not t.name.startswith("blk."))


def check_entries(expected: dict[str, tuple[int, ...]], entries: list[tuple[str, int, tuple[int, ...], int]],
                  what: str) -> tuple[TensorInfo, ...]:
    """Declared (name, type code, shape, n_bytes) entries, checked to be exactly the `expected`
    names and shapes in order, of supported types and honest sizes; offsets from the first."""
    names = [e[0] for e in entries]
    if names != list(expected):
        missing = [n for n in expected if n not in names]
        extra = [n for n in names if n not in expected]
        raise WeightError(
            f"tensors for {what} do not match: missing {missing[:3]}, unexpected {extra[:3]}, or out of order"
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
    return tuple(tensors)


class CacheDirInUse(OSError):
    """Another node process holds the cache directory."""


def lock_cache_dir(cache_dir: Path) -> IO[str] | None:
    """Hold `cache_dir` for this node process: two nodes on one directory would share its node
    id (coordinators then refuse the second as the same node) and write the same layers. The
    lock goes with the process, however it ends; None when the directory cannot be written
    (the node still serves, and says so when it needs its cache)."""
    path = Path(cache_dir) / LOCK_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path, "a+")
    except OSError as exc:
        log.warning("cannot lock the cache directory %s: %s", cache_dir, exc.strerror or exc)
        return None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        raise CacheDirInUse(f"cache directory {cache_dir} is in use by another caravan node"
                            f"{f' (pid {holder})' if holder.isdigit() else ''}: two nodes cannot share one "
                            "(it holds the node's id and weight cache); give this node its own --cache-dir") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


class CachedLayers:
    """A TensorSource over cached layers, each memory-mapped from its weights.bin. Once the
    layers are copied out, close() unmaps the files and drops their pages, so the node holds
    one copy of its weights, not also the file's (as the one-process loader does)."""

    def __init__(self, directories: list[Path]):
        self._tensors: dict[str, tuple[mmap.mmap | None, TensorInfo]] = {}
        self._files: list[tuple[Path, mmap.mmap]] = []
        for directory in directories:
            tensors = _cached_tensors(json.loads((directory / "manifest.json").read_text()))
            path = directory / "weights.bin"
            n_bytes = sum(t.n_bytes for t in tensors)
            if path.stat().st_size != n_bytes:
                raise WeightError(f"{path}: {path.stat().st_size} bytes, the manifest says {n_bytes}")
            with open(path, "rb") as f:
                data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._files.append((path, data))
            for info in tensors:
                self._tensors[info.name] = (data, info)

    def tensor_type(self, name: str) -> QT | None:
        entry = self._tensors.get(name)
        return None if entry is None else entry[1].type

    def tensor_data(self, name: str) -> np.ndarray:
        """A view of a matrix's bytes; a copy of a vector's (norms and biases are kept as read,
        and a view would keep its file mapped)."""
        data, info = self._tensors[name]
        view = tensor_view(data, info)
        return view.copy() if view.ndim == 1 else view

    def release(self, name: str) -> None:
        """Drop a tensor's pages from this process once it was repacked (GGUFFile.release)."""
        data, info = self._tensors[name]
        release_pages(data, info)

    def close(self) -> None:
        """Unmap every file and drop its pages from the page cache: the layers were copied."""
        for path, data in self._files:
            if hasattr(mmap, "MADV_DONTNEED"):
                data.madvise(mmap.MADV_DONTNEED)  # a page still mapped stays in the page cache
            try:
                data.close()
            except BufferError:  # an array still refers to it: its pages come back if read
                log.debug("%s stays mapped: an array still refers to it", path)
            drop_page_cache(path)
        self._files.clear()
        self._tensors.clear()


def _cached_tensors(meta: dict) -> tuple[TensorInfo, ...]:
    """The tensors a cache entry's manifest.json lists, checked as a push's are."""
    config = ModelConfig.from_dict(meta["config"])
    entries = [(n, c, tuple(s), b) for n, c, s, b in meta["tensors"]]
    if meta["layer"] == HEAD:
        tied = any(e[0] == "token_embd.weight" for e in entries)
        return check_entries(head_tensor_shapes(config, tied), entries, "the output head")
    layer = int(meta["layer"])
    return RangeManifest.build(meta["model_sha256"], config, LayerRange(layer, layer + 1), entries).tensors


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to drop the file's cached pages (those not yet written back go once they
    are): bytes a Pi's memory need not hold once they were copied."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as exc:
        log.debug("cannot drop the cached pages of %s: %s", path, exc)
    finally:
        os.close(fd)


class WeightCache:
    def __init__(self, root: Path):
        self.root = Path(root) / "layers"

    def _layer_dir(self, model_sha256: str, layer: int | str) -> Path:
        return self.root / model_sha256 / str(layer)

    def missing(self, model_sha256: str, layers: LayerRange) -> list[int]:
        """The layers of the range this cache does not hold (whole and readable)."""
        return [layer for layer in layers if not self._holds(model_sha256, layer)]

    def missing_head(self, model_sha256: str) -> bool:
        return not self._holds(model_sha256, HEAD)

    def _holds(self, model_sha256: str, entry: int | str) -> bool:
        directory = self._layer_dir(model_sha256, entry)
        try:
            CachedLayers([directory])
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring damaged cached layer %s: %s", directory, exc)
            return False
        return True

    def source(self, model_sha256: str, layers: LayerRange, head: bool = False) -> CachedLayers:
        entries: list[int | str] = [*layers, *([HEAD] if head else [])]
        return CachedLayers([self._layer_dir(model_sha256, entry) for entry in entries])

    def receive(self, manifest: RangeManifest, config: ModelConfig, layers: list[int], head: bool = False) -> "LayerWriter":
        return LayerWriter(self, manifest, config, layers, head)


class LayerWriter:
    """Bytes of some layers of a range as they arrive, in manifest order: counted against the
    manifest, hashed, written to temporary folders, and moved into the cache by finish()."""

    def __init__(self, cache: WeightCache, manifest: RangeManifest, config: ModelConfig, layers: list[int],
                 head: bool = False):
        if sorted(set(layers)) != layers or not all(l in manifest.layers for l in layers):
            raise WeightError(f"layers to push {layers} are not distinct, sorted and within {manifest.layers}")
        if head and not manifest.head:
            raise WeightError("the output head is pushed to a node that was not asked to hold it")
        if not layers and not head:
            raise WeightError(f"layers to push {layers} and no head: nothing to push for {manifest.layers}")
        self.cache, self.manifest, self.config = cache, manifest, config
        self.parts: list[tuple[int | str, tuple[TensorInfo, ...]]] = [(layer, manifest.layer_tensors(layer)) for layer in layers]
        if head:
            self.parts.append((HEAD, manifest.head_tensors()))
        self.expected = sum(t.n_bytes for _, tensors in self.parts for t in tensors)
        self.tmp = cache.root / manifest.model_sha256 / f".incoming-{uuid.uuid4().hex}"
        self.tmp.mkdir(parents=True)
        self._hash = hashlib.sha256()
        self.received = 0
        self._part = 0  # index into parts of the layer being written
        self._part_left = sum(t.n_bytes for t in self.parts[0][1])
        self._file = self._open(0)

    def _open(self, part: int):
        directory = self.tmp / str(self.parts[part][0])
        directory.mkdir()
        return open(directory / "weights.bin", "wb")

    def write(self, data: bytes) -> None:
        if self.received + len(data) > self.expected:
            raise WeightError(f"more than the {self.expected} bytes declared for layers {[l for l, _ in self.parts]}")
        self._hash.update(data)
        self.received += len(data)
        view = memoryview(data)
        while view:
            n = min(len(view), self._part_left)
            self._file.write(view[:n])
            view, self._part_left = view[n:], self._part_left - n
            if self._part_left == 0 and self._part + 1 < len(self.parts):
                self._file.close()
                self._part += 1
                self._part_left = sum(t.n_bytes for t in self.parts[self._part][1])
                self._file = self._open(self._part)

    def finish(self, sha256: str) -> None:
        self._file.close()
        if self.received != self.expected:
            raise WeightError(f"received {self.received} of the {self.expected} bytes of layers {[l for l, _ in self.parts]}")
        digest = self._hash.hexdigest()
        if sha256 != digest:
            raise WeightError(f"sha256 of the pushed layers is {digest}, the sender says {sha256}")
        for layer, tensors in self.parts:
            directory = self.tmp / str(layer)
            (directory / "manifest.json").write_text(json.dumps({
                "model_sha256": self.manifest.model_sha256,
                "layer": layer,
                "config": dataclasses.asdict(self.config),
                "tensors": [[t.name, int(t.type), list(t.shape), t.n_bytes] for t in tensors],
            }, indent=1))
            final = self.cache._layer_dir(self.manifest.model_sha256, layer)
            if final.exists():  # an older, damaged copy: the new one is verified
                shutil.rmtree(final)
            os.replace(directory, final)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def abort(self) -> None:
        self._file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
