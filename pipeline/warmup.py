"""Kernels compiled ahead of time, where a user waits anyway and is told why.

Numba compiles a format's kernels on their first call and caches them in NUMBA_CACHE_DIR
(numba_config.keep_compiled_kernels_in), a minute or more per format on a Pi. Here each format
is compiled on purpose, by one pass through a synthetic layer of the model's shape (speed.py's,
which runs the kernels a real layer runs), and an empty file `warm/<arch>-<FORMAT>` in the
cache folder records that it is done: checking it costs a stat, so a start-up can say
"compiling kernels for Q4_K, first run only" before the wait instead of being silent.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT

from .gguf_file import GGUFFile
from .model import ModelConfig, layer_tensor_shapes
from .quants import SUPPORTED_TYPES
from .speed import ms_per_layer

log = logging.getLogger(__name__)

# Without a model: a LLaMA layer whose widths are whole K-quant superblocks, so each format runs
# its own kernels (speed.py swaps in another format where rows do not split into superblocks).
GENERIC = ModelConfig(arch="llama", n_layers=1, dim=256, hidden_dim=512, n_heads=4, n_kv_heads=2, head_dim=64,
                      n_rot=64, vocab_size=256, context_length=64, norm_eps=1e-5, rope_theta=10000.0)
PREFILL_ROWS = 4  # the prefill pass: the kernels' several-row paths, then the one-row decode path


@dataclass(frozen=True)
class Warmed:
    format: str  # a GGML type name, e.g. Q4_K
    seconds: float
    compiled: bool  # False: the kernels were in the cache already


def marker_folder(environ=os.environ) -> Path | None:
    """Where the done-markers live: beside this version's compiled kernels (None: no cache)."""
    folder = environ.get("NUMBA_CACHE_DIR")
    return Path(folder) / "warm" if folder else None


def _marker(arch: str, ttype: QT) -> Path | None:
    folder = marker_folder()
    return folder / f"{arch}-{ttype.name}" if folder else None


def is_warm(arch: str, ttype: QT) -> bool:
    marker = _marker(arch, ttype)
    return marker is not None and marker.exists()


def nothing_compiled() -> bool:
    """True when no format's kernels were compiled for this version yet (False when unknown)."""
    folder = marker_folder()
    return folder is not None and not (folder.is_dir() and any(folder.iterdir()))


def model_formats(file: GGUFFile) -> list[QT]:
    """The formats of a model's layer matrices (warm_head covers the embedding and output), in GGML's order."""
    return sorted({info.type for name, info in file.tensors.items()
                   if name.startswith("blk.") and len(info.shape) == 2 and info.type in SUPPORTED_TYPES})


def layer_formats(source, config: ModelConfig, layer: int) -> list[QT]:
    """The formats of one layer's matrices in a TensorSource (a file, or layers a node received)."""
    types = {source.tensor_type(name) for name, shape in layer_tensor_shapes(config, layer).items() if len(shape) == 2}
    return sorted(t for t in types if t in SUPPORTED_TYPES)


def cold_formats(config: ModelConfig, formats: Iterable[QT]) -> list[QT]:
    """The formats whose kernels were not compiled for this architecture yet (empty when unknown:
    without a kernel cache nothing is remembered, so nothing is announced)."""
    if marker_folder() is None:
        return []
    return [t for t in formats if not is_warm(config.arch, t)]


def warm(config: ModelConfig, formats: Iterable[QT], announce: Callable[[str], None] = log.info) -> list[Warmed]:
    """Compile (or load from the cache) each format's kernels; `announce` hears, before each
    compile, which format and that it happens once."""
    done = []
    for ttype in formats:
        compiled = not is_warm(config.arch, ttype)
        if compiled:
            announce(f"compiling kernels for {ttype.name} ({config.arch}), first run only")
        start = time.perf_counter()
        ms_per_layer(config, ttype, repeats=1, context=PREFILL_ROWS)
        done.append(Warmed(ttype.name, time.perf_counter() - start, compiled))
        mark(config.arch, ttype)
    return done


def warm_head(head, config: ModelConfig) -> None:
    """The coordinator's own kernels: embedding rows and the output product, for a prompt and a token."""
    for rows in (PREFILL_ROWS, 1):
        head.logits(head.embed(np.arange(rows, dtype=np.int64) % config.vocab_size))


def mark(arch: str, ttype: QT) -> None:
    """Record that the kernels of `ttype` are compiled for `arch` (after they ran)."""
    marker = _marker(arch, ttype)
    if marker is None:
        return
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError as exc:  # a read-only cache: the next start announces a compile that may not come
        log.debug("cannot record %s as compiled: %s", marker, exc)
