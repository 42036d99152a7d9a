"""One block of memory for a stage's weight matrices, on huge pages where the system gives them.

A small model's matrices are small: SmolLM2's are 0.1 to 1 MB each, under the 4 MB from which
numpy asks Linux for huge pages itself, so each sits on 4 KB pages and a decode step, which
reads every one of them, walks about 16,000 pages through the TLB. Packed into one anonymous
mapping advised as huge pages (MADV_HUGEPAGE, what Linux's transparent huge pages in their
default "madvise" mode wait for), the same bytes take about 33 pages of 2 MB: a SmolLM2 decode
step of one row at 1 thread went from 8.65-9.04 to 8.16-8.37 ms (layers, head and argmax, the
two codes run in turn three times; at 2 threads the difference was within the machine's noise).
Large matrices (a 1.1B model's) are on huge pages already. Where the system has no huge pages
the block is ordinary memory.

A huge page is what one page-table entry of the middle level maps, so its size follows the
base page: 2 MiB under 4 KiB pages (x86-64, most arm64 kernels), 32 MiB under the 16 KiB pages
of a Raspberry Pi 5's kernel, 512 MiB under 64 KiB pages. The kernel says which in sysfs, and
whether transparent huge pages are on at all. The block starts on a huge page's boundary and
only the whole huge pages within it are advised, so its tail stays on base pages rather than
taking a whole huge page.
"""

from __future__ import annotations

import functools
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .model import ModelConfig, TensorSource, layer_tensor_shapes
from .quants import SUPPORTED_TYPES, PackedMatrix, packed_nbytes

ALIGN = 64  # bytes: a cache line, and more than any array's element needs
THP_DIR = Path("/sys/kernel/mm/transparent_hugepage")  # Linux's transparent huge page settings
PAGE_TABLE_ENTRY = 8  # bytes: a huge page is the memory one page of such entries maps
ARRAYS_PER_MATRIX = 8  # a PackedMatrix has at most this many arrays (quants, scales, minima...)


def _aligned(n_bytes: int) -> int:
    return -(-n_bytes // ALIGN) * ALIGN


def room_for(matrices: Iterable[PackedMatrix | None]) -> int:
    """Bytes an arena needs for these matrices' arrays, or for any stack of them."""
    return sum(_aligned(a.nbytes) for m in matrices if m is not None for a in m.arrays)


def room_in_file(source: TensorSource, config: ModelConfig, layers: Iterable[int]) -> int:
    """At least room_for() the matrices of these layers, from their types and shapes in the file,
    before any is read (a type caravan cannot run is left for the loader to refuse)."""
    total = 0
    for layer in layers:
        for name, shape in layer_tensor_shapes(config, layer).items():
            ttype = source.tensor_type(name)
            if len(shape) == 2 and ttype in SUPPORTED_TYPES:
                total += packed_nbytes(ttype, shape[1], shape[0]) + ARRAYS_PER_MATRIX * ALIGN
    return total


@dataclass(frozen=True)
class HugePages:
    """What the kernel offers: its base page, its transparent huge page, and whether an
    madvise(MADV_HUGEPAGE) gets them."""

    page: int  # bytes
    huge: int  # bytes
    enabled: bool


def huge_page_for(page: int) -> int:
    """The huge page of a kernel with `page`-byte pages: 4 KiB -> 2 MiB, 16 KiB -> 32 MiB."""
    return page * (page // PAGE_TABLE_ENTRY)


def read_huge_pages(thp_dir: Path = THP_DIR, page: int | None = None) -> HugePages:
    """From sysfs: `hpage_pmd_size` (else derived from the base page) and `enabled`, whose
    choice is bracketed ("always [madvise] never"); no directory means a kernel built without
    transparent huge pages."""
    page = page or mmap.PAGESIZE
    try:
        huge = int((thp_dir / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        huge = huge_page_for(page)
    try:
        mode = (thp_dir / "enabled").read_text()
    except OSError:
        mode = "[never]"
    enabled = "[never]" not in mode and hasattr(mmap, "MADV_HUGEPAGE") and huge > page and huge % page == 0
    return HugePages(page, huge, enabled)


@functools.cache
def system_huge_pages() -> HugePages:
    return read_huge_pages()


class WeightArena:
    """`n_bytes` of memory, handed out in order as arrays aligned to 64 bytes. Pages are made
    resident as arrays are written, so an arena sized from above costs only what it holds, and
    its memory goes back to the system as a whole once no array of it is left. `pages`: what
    the kernel offers (default: read from sysfs once per process)."""

    def __init__(self, n_bytes: int, pages: HugePages | None = None):
        pages = pages or system_huge_pages()
        size = max(-(-n_bytes // pages.page) * pages.page, pages.page)
        self.huge_bytes = size // pages.huge * pages.huge if pages.enabled else 0  # advised as huge pages
        # A huge page must start on a multiple of its size: map that much more, start there.
        slack = pages.huge - pages.page if self.huge_bytes else 0
        block = mmap.mmap(-1, size + slack, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        whole = np.frombuffer(block, np.uint8)
        start = -whole.ctypes.data % pages.huge if self.huge_bytes else 0
        if self.huge_bytes:
            try:
                block.madvise(mmap.MADV_HUGEPAGE, start, self.huge_bytes)
            except OSError:  # the kernel refused after all: ordinary pages
                self.huge_bytes = 0
        self._bytes = whole[start : start + size]
        self._used = 0

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A new, uninitialised C-contiguous array."""
        dtype = np.dtype(dtype)
        n_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self._used + n_bytes > self._bytes.size:
            raise MemoryError(f"weight arena of {self._bytes.size} bytes is full ({self._used} used, {n_bytes} asked)")
        out = self._bytes[self._used : self._used + n_bytes].view(dtype).reshape(shape)
        self._used += _aligned(n_bytes)
        return out

    def copy(self, matrix: PackedMatrix) -> PackedMatrix:
        """The matrix, its arrays copied here."""
        arrays = []
        for a in matrix.arrays:
            out = self.take(a.shape, a.dtype)
            out[...] = a
            arrays.append(out)
        return PackedMatrix(matrix.type, matrix.rows, matrix.cols, tuple(arrays))

    def concatenate(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """np.concatenate along the first axis, into this arena."""
        first = arrays[0]
        out = self.take((sum(a.shape[0] for a in arrays), *first.shape[1:]), first.dtype)
        return np.concatenate(arrays, out=out)
