"""Model files in the cache: downloaded once, atomically, and SHA256-verified before first use.

The cache is the folder named by CT2X_CACHE_DIR, else the platform's cache folder for ct2x: Linux
$XDG_CACHE_HOME/ct2x (~/.cache/ct2x), macOS ~/Library/Caches/ct2x, Windows %LOCALAPPDATA%\\ct2x\\Cache. Its `models`
folder holds NAME.safetensors for each registry entry, and, once that file's SHA256 has been checked,
NAME.safetensors.verified.json recording the file's size, modification time and SHA256: a file that still has that
size and time is used as it is, without hashing it again.

A download goes into a temporary file beside its place and is renamed into place only when complete and verified:
a failed or interrupted download, or one with the wrong SHA256, leaves nothing. Weights that cannot be downloaded
automatically (registry entries with `manual` instructions) are imported into the same place by hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator, Union

from ct2x.errors import CT2XInputError, CT2XWarning
from ct2x.models.model_file import atomic_file, read_info
from ct2x.models.registry import RegistryEntry, find_model, load_registry
from ct2x.text import size_text

CACHE_ENV = "CT2X_CACHE_DIR"
VERIFIED_SUFFIX = ".verified.json"
TIMEOUT_S = 30.0  # longest wait for the server to answer or send more data, seconds
CHUNK_BYTES = 1 << 20
PROGRESS_DELAY_S = 1.0  # the progress bar shows once a download has taken this long, seconds

Model = Union[str, RegistryEntry]  # a registry name, or an entry (e.g. from a registry file of your own)


class DownloadError(OSError):
    """A model file could not be downloaded (no connection, server error) or arrived damaged."""


def cache_root() -> Path:
    """ct2x's cache folder (absolute): $CT2X_CACHE_DIR, else the platform's (see the module docstring)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser().absolute()
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA")
        return (Path(local) if local else Path.home() / "AppData" / "Local") / "ct2x" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "ct2x"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "ct2x"


def cache_path(model: Model) -> Path:
    """Where the model file of `model` is (or goes) in the cache."""
    entry = _entry(model)
    return cache_root() / "models" / entry.file_name


def cache_state(model: Model) -> str:
    """"verified", "unverified" (present, SHA256 not checked yet), "imported" (weights fetched by hand) or "absent".

    Cheap: never hashes the file.
    """
    entry = _entry(model)
    path = cache_path(entry)
    if not path.is_file():
        return "absent"
    if entry.manual is not None:
        return "imported"
    return "verified" if _recorded_sha256(path) == entry.sha256 else "unverified"


def cached_path(model: Model) -> Path:
    """The verified model file of `model` in the cache; CT2XInputError saying how to get it when it is not there.

    A file not verified yet is hashed now (once); one with the wrong SHA256 is deleted, with a CT2XWarning. For
    weights imported by hand, the file's header must name the registry entry's kind.
    """
    entry = _entry(model)
    path = cache_path(entry)
    if path.is_file() and _verify(entry, path):
        return path
    with contextlib.suppress(OSError):  # so that the file can be put where the message says
        path.parent.mkdir(parents=True, exist_ok=True)
    raise CT2XInputError(_how_to_get(entry, path))


def model_path(model: Union[str, os.PathLike]) -> Path:
    """`model` as a model file: the file itself when it exists, else the cached file of the registry entry of that
    name (its download or import instructions when absent); CT2XInputError for neither."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if path.suffix != ".safetensors" and str(model) in load_registry():
        return cached_path(str(model))
    raise CT2XInputError(f"{path}: no such model file (`ct2x models list` names the models ct2x knows)")


def download(model: Model, progress: Union[bool, Callable[[float], None]] = True) -> Path:
    """The verified model file of `model`, downloaded into the cache unless it is there already.

    `progress`: True shows a bar on stderr for downloads longer than PROGRESS_DELAY_S; a callable is called with the
    fraction downloaded (0 ... 1) after each piece instead (an exception raised in it stops the download, which
    leaves nothing in the cache). DownloadError (an OSError) when the
    server cannot be reached (the message says which file to fetch by hand and where to put it) or the download is
    damaged; CT2XInputError for weights that must be fetched by hand, with the instructions.
    """
    entry = _entry(model)
    path = cache_path(entry)
    if entry.manual is not None:
        return cached_path(entry)
    if path.is_file() and _verify(entry, path):
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create the model cache {path.parent}: {error.strerror or error}; set {CACHE_ENV} to "
                      "a folder you can write") from None
    with atomic_file(path) as temporary:
        sha256 = _fetch(entry, temporary, progress)
        if sha256 != entry.sha256:
            raise DownloadError(f"{entry.url}: the download's SHA256 is {sha256}, not {entry.sha256}: deleted it. "
                                "Try again; if it happens again, the file at that address is not the one this ct2x "
                                "expects (damaged on the way, or replaced)")
    _record_verified(path, sha256)
    return path


def _entry(model: Model) -> RegistryEntry:
    return model if isinstance(model, RegistryEntry) else find_model(model)


def _fetch(entry: RegistryEntry, destination: Path, progress: Union[bool, Callable[[float], None]]) -> str:
    """Download `entry.url` into `destination`; returns its SHA256 (hex). DownloadError when the download fails or
    its size is not `entry.size_bytes`."""
    from tqdm import tqdm

    hasher = hashlib.sha256()
    received = 0  # bytes
    with open(destination, "wb") as file, tqdm(total=entry.size_bytes, unit="B", unit_scale=True, file=sys.stderr,
                                               desc=f"downloading {entry.name}", disable=progress is not True,
                                               delay=PROGRESS_DELAY_S) as bar:
        for chunk in _chunks(entry):
            received += len(chunk)
            if received > entry.size_bytes:
                break
            hasher.update(chunk)
            file.write(chunk)
            bar.update(len(chunk))
            if callable(progress):
                progress(received / entry.size_bytes)
    if received > entry.size_bytes:
        raise DownloadError(f"{entry.url}: the file there is larger than the {entry.size_bytes} bytes expected, so it "
                            "is not the one this ct2x expects: deleted the download")
    if received < entry.size_bytes:
        raise DownloadError(_unreachable(entry, f"the connection ended after {received} of {entry.size_bytes} "
                                                "bytes; try again"))
    return hasher.hexdigest()


def _chunks(entry: RegistryEntry) -> Iterator[bytes]:
    """The bytes at `entry.url`, piece by piece; DownloadError saying what to do by hand when the server fails."""
    import http.client
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(entry.url, timeout=TIMEOUT_S) as response:
            while True:
                chunk = response.read(CHUNK_BYTES)
                if not chunk:
                    return
                yield chunk
    except (OSError, http.client.HTTPException) as error:
        if isinstance(error, urllib.error.HTTPError):
            reason = f"HTTP {error.code} {error.reason}"
        elif isinstance(error, urllib.error.URLError):
            reason = str(error.reason)
        else:
            reason = str(error) or type(error).__name__
        raise DownloadError(_unreachable(entry, reason)) from None


def _unreachable(entry: RegistryEntry, reason: str) -> str:
    return (f"could not download {entry.name} from {entry.url} ({reason}). Without a connection, fetch that file by "
            f"hand and put it at {cache_path(entry)}; ct2x checks its SHA256 ({entry.sha256}) before first use")


def _verify(entry: RegistryEntry, path: Path) -> bool:
    """Whether the cached `path` is `entry`'s file: SHA256 recorded or, once, computed (a wrong file is deleted, with a
    CT2XWarning); for weights imported by hand, the kind in its header."""
    if entry.manual is not None:
        kind = read_info(path).kind
        if kind != entry.kind:
            raise CT2XInputError(f"{path}: holds a {kind} model, not {entry.kind}; import the right weights: "
                                 f"{entry.manual.command_for(path)}")
        return True
    if _recorded_sha256(path) == entry.sha256:
        return True
    sha256 = _sha256_of(path)
    if sha256 == entry.sha256:
        _record_verified(path, sha256)
        return True
    for stale in (path, _record_path(path)):
        stale.unlink(missing_ok=True)
    warnings.warn(f"{path}: its SHA256 is {sha256}, not {entry.sha256} (damaged, or not the published file): deleted "
                  "it", CT2XWarning, stacklevel=3)
    return False


def _how_to_get(entry: RegistryEntry, path: Path) -> str:
    if entry.manual is None:
        return (f"{entry.name} is not in the cache yet: `ct2x models download {entry.name}` fetches it "
                f"({size_text(entry.size_bytes)} from {entry.url}); without a connection, fetch that file by hand "
                f"and put it at {path}")
    return (f"{entry.name} is not in the cache ({path}), and its weights ({entry.license}) cannot be downloaded "
            f"automatically:\n  1. {entry.manual.instructions} Page: {entry.manual.page}\n"
            f"  2. Turn them into a CT2X model file: {entry.manual.command_for(path)}")


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + VERIFIED_SUFFIX)


def _record_verified(path: Path, sha256: str) -> None:
    """Write the sidecar that vouches for `path` while its size and modification time stay as they are now."""
    status = path.stat()
    record = {"sha256": sha256, "size_bytes": status.st_size, "mtime_ns": status.st_mtime_ns}
    with atomic_file(_record_path(path)) as temporary:
        temporary.write_text(json.dumps(record) + "\n", encoding="utf-8")


def _recorded_sha256(path: Path) -> str:
    """The SHA256 the sidecar records for `path`, or "" when there is none or the file changed since."""
    try:
        record = json.loads(_record_path(path).read_text(encoding="utf-8"))
        status = path.stat()
        if record["size_bytes"] == status.st_size and record["mtime_ns"] == status.st_mtime_ns:
            return str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return ""


def _sha256_of(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(CHUNK_BYTES), b""):
            hasher.update(chunk)
    return hasher.hexdigest()
