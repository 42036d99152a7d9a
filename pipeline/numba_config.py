"""Settings shared by every compiled kernel in caravan."""

import hashlib
import os
import re
import shutil
import time
from pathlib import Path

# One fastmath set for the whole project: reassociation and contraction let LLVM vectorize
# reductions; "nnan"/"ninf" are left out so NaN and Inf stay honest (stumpy does the same).
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


NODE_SPIN = "10000"  # a node: spin through its own stage's kernels, then yield
WAITING_SPIN = "0"  # a coordinator with remote stages: it mostly waits on them


def spin_briefly_when_idle(spin_count: str, environ=os.environ) -> None:
    """Make idle OpenMP workers sleep soon, for processes that wait on other processes.

    GNU OpenMP (Numba's omp threading layer) keeps idle worker threads spinning for about
    300,000 turns after each parallel region. A node is idle between its batches, and a
    coordinator while its nodes work; when they share a machine that spinning takes the cores
    the others need. Measured with 3 nodes at 2 threads on 2 cores: 28 tokens/s with the
    defaults, 94 with nodes at NODE_SPIN and the coordinator at WAITING_SPIN (61 with both
    waiting passively: a node's kernels follow each other within microseconds). Must run
    before the process's first parallel region (libgomp reads it once); an operator's own
    setting wins. One process running every layer keeps the default."""
    environ.setdefault("GOMP_SPINCOUNT", spin_count)


# A folder of one version's kernels: kernel_sources_fingerprint(), or, from versions before
# those, what Numba names a source folder's cache (its name and a hash of its path).
_VERSION_FOLDER = re.compile(r"[0-9a-f]{16}|\w+_[0-9a-f]{40}")


def kernel_sources_fingerprint(folder: Path = Path(__file__).parent) -> str:
    """16 hex digits of sha256 over the pipeline's Python sources, its subpackages' included
    (paths and contents).

    Numba checks a cached function against its own source file only: a kernel in
    formats/legacy.py that inlines vector.py's IR stays cached after vector.py changes. Kernels
    cached under this fingerprint are never used by another version of the sources, an upgrade
    included."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


KEEP_OTHER_VERSIONS_DAYS = 30  # other versions' compiled kernels are removed after this long unused


def keep_compiled_kernels_in(cache_dir, environ=os.environ) -> None:
    """Cache Numba's compiled kernels under caravan's cache directory
    (`<cache_dir>/numba/<kernel_sources_fingerprint()>`), so they are compiled once per machine
    and version, not per process, even where caravan's own folder is not writable. Numba fixes a
    function's cache location when the function is defined, so this runs before any kernel
    module is imported (the entry points do it first); an operator's own NUMBA_CACHE_DIR wins
    (and then keeping it apart per version is theirs to do).

    Each start marks its own folder as used; folders of other versions that no process has used
    for KEEP_OTHER_VERSIONS_DAYS are removed (a few MB each, one per upgrade), as are those that
    versions before these folders left in `<cache_dir>/numba` itself. A version still in use
    that loses its folder only compiles its kernels again."""
    if "NUMBA_CACHE_DIR" in environ:
        return
    root = Path(cache_dir) / "numba"
    mine = root / kernel_sources_fingerprint()
    environ["NUMBA_CACHE_DIR"] = os.fspath(mine)
    try:
        mine.mkdir(parents=True, exist_ok=True)
        os.utime(mine)
        _remove_unused_versions(root, mine.name, time.time() - KEEP_OTHER_VERSIONS_DAYS * 86400)
    except OSError:  # a read-only or shared cache: Numba then caches where it can, or not at all
        pass


def _remove_unused_versions(root: Path, mine: str, before: float) -> None:
    """Other versions' folders under root last used before `before` (a time), and those that
    versions before these folders left in root itself."""
    for path in root.iterdir():
        if path.name != mine and _VERSION_FOLDER.fullmatch(path.name) and path.is_dir() and path.stat().st_mtime < before:
            shutil.rmtree(path, ignore_errors=True)
