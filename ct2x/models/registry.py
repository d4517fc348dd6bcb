"""The models ct2x knows by name, listed in registry.json beside this file.

registry.json is {"format_version": 1, "models": [ENTRY, ...]}; each ENTRY has

    name          lowercase letters, digits, ".", "_", "-": the name on the command line and the cached file's name
    kind          the architecture (ct2x.models.architectures), as in the model file's metadata
    description   one line for people
    license       the weights' licence, an SPDX identifier where there is one
and either, for a model ct2x downloads itself,
    url           https:// (or http://, file://) address of the model file (.safetensors)
    sha256        its SHA256, 64 lowercase hex digits, checked before first use
    size_bytes    its size in bytes
or, for weights that must be fetched by hand (licence or host forbid automatic download),
    manual        {"page": web page to fetch them from, "instructions": what to fetch there,
                   "import_command": the command that turns them into the model file; "{path}" in it stands for
                   the model file's place in the cache}
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

from ct2x.errors import CT2XInputError
from ct2x.models.model_file import SUFFIX

PathLike = Union[str, os.PathLike]

REGISTRY_PATH = Path(__file__).with_name("registry.json")
REGISTRY_FORMAT_VERSION = 1
URL_SCHEMES = ("https://", "http://", "file://")
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ManualDownload:
    """How to get weights that ct2x cannot download itself."""

    page: str  # web page that links the weights
    instructions: str  # what to fetch there
    import_command: str  # turns them into the model file; "{path}" stands for its place in the cache

    def command_for(self, path: Path) -> str:
        """The import command writing to `path`, quoted for this platform's shell."""
        text = str(path)
        if sys.platform == "win32":
            quoted = f'"{text}"' if " " in text else text
        else:
            quoted = shlex.quote(text)
        return self.import_command.replace("{path}", quoted)


@dataclass(frozen=True)
class RegistryEntry:
    """A model known by name: a downloadable file (url, sha256, size_bytes) or weights fetched by hand (manual)."""

    name: str
    kind: str
    description: str
    license: str
    url: Optional[str] = None
    sha256: Optional[str] = None
    size_bytes: Optional[int] = None
    manual: Optional[ManualDownload] = None

    @property
    def file_name(self) -> str:
        """The model file's name in the cache."""
        return self.name + SUFFIX


def load_registry(path: Optional[PathLike] = None) -> Dict[str, RegistryEntry]:
    """The entries of the registry file (default REGISTRY_PATH) by name, in file order; CT2XInputError naming the
    entry and field when the file is malformed."""
    path = Path(REGISTRY_PATH if path is None else path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise CT2XInputError(f"{path}: model registry is not JSON ({error})") from None
    if not isinstance(data, dict) or data.get("format_version") != REGISTRY_FORMAT_VERSION or \
            not isinstance(data.get("models"), list):
        raise CT2XInputError(f"{path}: a model registry is {{\"format_version\": {REGISTRY_FORMAT_VERSION}, "
                             "\"models\": [...]}")
    entries: Dict[str, RegistryEntry] = {}
    for index, item in enumerate(data["models"]):
        try:
            entry = _entry(item)
        except CT2XInputError as error:
            raise CT2XInputError(f"{path}: model {index} ({_name_of(item)}): {error}") from None
        if entry.name in entries:
            raise CT2XInputError(f"{path}: model name {entry.name!r} appears twice")
        entries[entry.name] = entry
    return entries


def find_model(name: str, registry: Optional[PathLike] = None) -> RegistryEntry:
    """The registry entry called `name`; CT2XInputError listing the known names otherwise."""
    entries = load_registry(registry)
    if name not in entries:
        raise CT2XInputError(f"no model called {name!r}; known models: {', '.join(entries) or 'none'} "
                             "(`ct2x models list` describes them)")
    return entries[name]


def _entry(item: object) -> RegistryEntry:
    if not isinstance(item, dict):
        raise CT2XInputError("must be a JSON object")
    fields = {"name", "kind", "description", "license", "url", "sha256", "size_bytes", "manual"}
    unknown = sorted(set(item) - fields)
    if unknown:
        raise CT2XInputError(f"unknown field {unknown[0]!r}")
    for key in ("name", "kind", "description", "license"):
        if not isinstance(item.get(key), str) or not item[key]:
            raise CT2XInputError(f"{key!r} must be a non-empty string")
    if not _NAME.fullmatch(item["name"]):
        raise CT2XInputError("'name' may hold only lowercase letters, digits, '.', '_' and '-', starting with a "
                             "letter or digit")
    if "manual" in item:
        return RegistryEntry(**{**item, "manual": _manual(item)})
    url, sha256, size_bytes = item.get("url"), item.get("sha256"), item.get("size_bytes")
    if not isinstance(url, str) or not url.startswith(URL_SCHEMES):
        raise CT2XInputError(f"'url' must start with {', '.join(URL_SCHEMES)} (or give 'manual' instructions)")
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise CT2XInputError("'sha256' must be 64 lowercase hex digits")
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes <= 0:
        raise CT2XInputError("'size_bytes' must be a positive integer")
    return RegistryEntry(**item)


def _manual(item: dict) -> ManualDownload:
    if any(key in item for key in ("url", "sha256", "size_bytes")):
        raise CT2XInputError("give either 'manual' or 'url', 'sha256' and 'size_bytes', not both")
    manual = item["manual"]
    keys = ("page", "instructions", "import_command")
    if not isinstance(manual, dict) or set(manual) != set(keys) or \
            not all(isinstance(manual[key], str) and manual[key] for key in keys):
        raise CT2XInputError(f"'manual' must hold the texts {', '.join(map(repr, keys))}, and no more")
    if "{path}" not in manual["import_command"]:
        raise CT2XInputError("'manual': 'import_command' must write to {path}, the model file's place in the cache")
    return ManualDownload(**manual)


def _name_of(item: object) -> str:
    return repr(item["name"]) if isinstance(item, dict) and "name" in item else "no name"
