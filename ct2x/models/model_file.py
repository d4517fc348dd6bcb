"""CT2X model files: one `.safetensors` file holding a network's weights and, in its header, what the network is.

Layout: a standard safetensors file (https://github.com/huggingface/safetensors): the network's state_dict as tensors,
and in the header's string-to-string metadata one entry, "ct2x", whose value is the JSON of a `ModelInfo`. One file
is one download and one SHA256; any safetensors reader can open it, and loading never runs code from the file
(no pickle). Files are written deterministically (no time stamp), so the same weights and metadata give the same
SHA256.

    save_model("model.safetensors", network, ModelInfo(kind="x2ct-biplanar", config={...}, license="GPL-3.0", ...))
    network, info = load("model.safetensors", device="cuda")   # eval mode, on the device

`ModelInfo.inputs` and `.outputs` state the network's conventions; the keys depend on the kind. A reconstruction
network (films in, CT out) uses, for example:

    inputs  = {"views": ["PA", "lateral"], "size_px": [128, 128], "pixel_spacing_mm": 2.5,
               "orientation": "radiological display convention (ct2x/geometry.py)",
               "normalisation": "attenuation scaled to [0, 1] per film"}
    outputs = {"shape_kji": [128, 128, 128], "voxel_size_mm": [2.5, 2.5, 2.5], "field_of_view_mm": [320, 320, 320],
               "orientation": "KJI arrays, RAS affine (ct2x/conventions.py)", "hu_mapping": "HU = 2500 x - 1024"}

Metrics each give a value and the convention it was measured with:
`{"psnr_x2ct_db": {"value": 26.19, "convention": "ct2x.metrics.reconstruction.psnr_x2ct, 102 LIDC test CTs"}}`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, NamedTuple, Tuple, Union

from ct2x import __version__
from ct2x.errors import CT2XInputError
from ct2x.models.architectures import build_network

if TYPE_CHECKING:
    import torch

PathLike = Union[str, os.PathLike]

FORMAT_VERSION = 1  # of ModelInfo's JSON; raise it when a field is added, renamed or changes meaning
METADATA_KEY = "ct2x"  # the safetensors header metadata entry that holds ModelInfo's JSON
SUFFIX = ".safetensors"
REWRITE_HINT = "download, import or save the model file again"


class NewerFormatError(CT2XInputError):
    """A model file written in a newer format than this ct2x reads: update ct2x."""


@dataclass(frozen=True)
class ModelInfo:
    """What a model file's network is, how to build it, and the conventions of its inputs and outputs.

    kind: the architecture's name (ct2x.models.architectures), e.g. "x2ct-biplanar".
    config: keyword arguments of that architecture's constructor (JSON values).
    license: the weights' licence, an SPDX identifier where there is one (e.g. "GPL-3.0", "Apache-2.0").
    description: one line for people.
    inputs, outputs: the network's input and output conventions (see the module docstring).
    training_data: what it was trained on, e.g. {"dataset": "LIDC-IDRI", "cases": 916, "films": "DRRs, ..."}.
    metrics: name -> {"value": number, "convention": how it was measured, ...}.
    source: where the weights come from, e.g. {"checkpoint": "90_net_G.pth", "sha256": "...", "page": "https://..."}.
    created_by: "ct2x VERSION" that wrote the file (set by save_model).
    format_version: of this metadata (FORMAT_VERSION when written).
    """

    kind: str
    config: Dict[str, Any]
    license: str
    description: str = ""
    inputs: Dict[str, Any] = field(default_factory=dict)
    outputs: Dict[str, Any] = field(default_factory=dict)
    training_data: Dict[str, Any] = field(default_factory=dict)
    metrics: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    source: Dict[str, Any] = field(default_factory=dict)
    created_by: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        """CT2XInputError naming the first field that is missing, of the wrong type or not JSON."""
        for name in ("kind", "license"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise CT2XInputError(f"{name!r} must be a non-empty string, got {getattr(self, name)!r}")
        for name in ("description", "created_by"):
            if not isinstance(getattr(self, name), str):
                raise CT2XInputError(f"{name!r} must be a string, got {getattr(self, name)!r}")
        for name in ("config", "inputs", "outputs", "training_data", "metrics", "source"):
            if not isinstance(getattr(self, name), dict):
                raise CT2XInputError(f"{name!r} must be a JSON object, got {getattr(self, name)!r}")
        for name, metric in self.metrics.items():
            value = metric.get("value") if isinstance(metric, dict) else None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                    not isinstance(metric.get("convention"), str) or not metric["convention"]:
                raise CT2XInputError(f"metric {name!r} must be {{\"value\": finite number, \"convention\": text}}, "
                                     f"got {metric!r}")
        _check_format_version(self.format_version)
        try:
            self.to_json()
        except (TypeError, ValueError) as error:
            raise CT2XInputError(f"not JSON: {error}") from None

    def to_json(self) -> str:
        """Compact JSON, keys sorted (the same info gives the same text)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ModelInfo:
        """The ModelInfo in `text`; CT2XInputError saying what is malformed."""
        try:
            data = json.loads(text)
        except ValueError as error:
            raise CT2XInputError(f"not JSON ({error})") from None
        if not isinstance(data, dict):
            raise CT2XInputError(f"not a JSON object but {type(data).__name__}")
        if "format_version" not in data:
            raise CT2XInputError("missing field 'format_version'")
        _check_format_version(data["format_version"])  # first: a newer format may have fields this ct2x lacks
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise CT2XInputError(f"unknown field{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}")
        required = [name for name, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise CT2XInputError(f"missing field{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}")
        return cls(**data)


class ModelHeader(NamedTuple):
    """What a model file's header says: its ModelInfo and each tensor's (shape, safetensors dtype, e.g. "F32")."""

    info: ModelInfo
    tensors: Dict[str, Tuple[Tuple[int, ...], str]]


class LoadedModel(NamedTuple):
    """A network read from a model file, in eval mode on the requested device, and its ModelInfo."""

    network: torch.nn.Module
    info: ModelInfo


def save_model(path: PathLike, network: torch.nn.Module, info: ModelInfo) -> Path:
    """Write `network`'s weights and `info` to a `.safetensors` model file, atomically; returns the path.

    `info.created_by` is set to this ct2x. The network must be the one `info.kind` builds from `info.config` (same
    tensor names and shapes), so that the file loads: CT2XInputError otherwise, before anything is written.
    """
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    if path.suffix != SUFFIX:
        raise CT2XInputError(f"{path}: a model file's name ends in {SUFFIX}")
    if not path.parent.is_dir():
        raise CT2XInputError(f"{path}: folder {path.parent} does not exist; create it first")
    info = dataclasses.replace(info, created_by=f"ct2x {__version__}", format_version=FORMAT_VERSION)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in network.state_dict().items()}
    problems = _misfits(_shapes(build_network(info.kind, info.config).state_dict()), _shapes(tensors))
    if problems:
        raise CT2XInputError(f"{path}: the network is not what {info.kind} builds from the configuration "
                             f"{json.dumps(info.config)}: {problems}; pass the configuration it was built with")
    with atomic_file(path) as temporary:
        save_file(tensors, str(temporary), metadata={METADATA_KEY: info.to_json()})
    return path


def load(path: PathLike, device: Union[str, torch.device] = "cpu") -> LoadedModel:
    """The network in the model file at `path`, in eval mode on `device`, with its ModelInfo.

    Reads tensors only (safetensors, never pickle). CT2XInputError naming the file, the problem and what to do when
    it is not a readable model file, its metadata is missing or malformed, its kind unknown, its configuration
    refused, or its tensors do not fit the network (missing, unexpected, wrong shape, not finite).
    """
    import torch
    from safetensors import safe_open

    from ct2x.device import torch_device

    target = torch_device(device)
    path = Path(path).expanduser()
    header = read_header(path)
    try:
        with torch.device("meta"):  # shapes only: every weight comes from the file (no random initialisation)
            network = build_network(header.info.kind, header.info.config)
    except CT2XInputError as error:
        raise CT2XInputError(f"{path}: {error}; the file may come from another ct2x version: update ct2x, or "
                             "write the file again with this one") from None
    problems = _misfits(_shapes(network.state_dict()), {name: shape for name, (shape, _) in header.tensors.items()})
    if problems:
        raise CT2XInputError(f"{path}: the weights do not fit the {header.info.kind} network its configuration "
                             f"builds: {problems}; the file is damaged or was not written by ct2x: {REWRITE_HINT}")
    with _reading(path), safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise CT2XInputError(f"{path}: tensor {name!r} holds NaN or infinite values; the weights are unusable: "
                                 f"{REWRITE_HINT} (or, for your own training, save an earlier checkpoint)")
    network.load_state_dict(tensors, assign=True)
    unset = [name for name, tensor in [*network.named_parameters(), *network.named_buffers()] if tensor.is_meta]
    if unset:
        raise CT2XInputError(f"{path}: the {header.info.kind} network has tensors that no model file holds "
                             f"({', '.join(unset[:5])}); this ct2x cannot load it: update ct2x")
    return LoadedModel(network.to(target).eval(), header.info)


def read_info(path: PathLike) -> ModelInfo:
    """The ModelInfo of the model file at `path`, read from its header only (fast; no torch needed)."""
    return read_header(path).info


def read_header(path: PathLike) -> ModelHeader:
    """The ModelInfo and tensor shapes of the model file at `path`, read from its header only; CT2XInputError for a
    missing file, one that is not safetensors, and missing or malformed CT2X metadata."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.exists():
        raise CT2XInputError(f"{path}: no such model file")
    if not path.is_file():
        what = f"a folder, not a model file ({SUFFIX})" if path.is_dir() else "not a regular file"
        raise CT2XInputError(f"{path}: is {what}")
    with _reading(path), safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata() or {}
        tensors = {name: (tuple(handle.get_slice(name).get_shape()), handle.get_slice(name).get_dtype())
                   for name in handle.keys()}
    if METADATA_KEY not in metadata:
        raise CT2XInputError(f"{path}: a safetensors file without CT2X metadata (no {METADATA_KEY!r} entry in its "
                             "header), so not a CT2X model file; make one with `ct2x models import` or "
                             "ct2x.models.save_model")
    try:
        info = ModelInfo.from_json(metadata[METADATA_KEY])
    except NewerFormatError as error:
        raise NewerFormatError(f"{path}: {error}") from None
    except CT2XInputError as error:
        raise CT2XInputError(f"{path}: malformed CT2X metadata: {error}; the file is damaged or was not written by "
                             f"ct2x: {REWRITE_HINT}") from None
    return ModelHeader(info, tensors)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a new empty file beside `path` to write; when the block succeeds it replaces `path`, else it is removed.

    Readers never see a half-written `path`. It gets the ordinary mode for new files (0o666 less the umask), also
    when the writer replaced the temporary file with one of its own.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    ordinary_mode = stat.S_IMODE(os.fstat(descriptor).st_mode)
    os.close(descriptor)
    try:
        yield temporary
        os.chmod(temporary, ordinary_mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn safetensors' errors into CT2XInputError (unreadable content) or an OSError naming `path`."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as error:
        raise CT2XInputError(f"{path}: not a readable safetensors file ({error}): it is damaged, truncated or in "
                             f"another format; {REWRITE_HINT}") from None
    except OSError as error:
        failure = OSError(f"{path}: cannot read: {error.strerror or error}")
        failure.errno = error.errno
        raise failure from None


def _check_format_version(version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CT2XInputError(f"'format_version' must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise NewerFormatError(f"written in model file format {version} by a newer ct2x; this ct2x {__version__} "
                               f"reads formats up to {FORMAT_VERSION}: update ct2x")


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in `tensor`: a finite sum proves it (any NaN or infinity would make the sum one), fast; an
    infinite sum may be an overflow, so only then is each value checked."""
    return bool(tensor.sum().isfinite()) or bool(tensor.isfinite().all())


def _shapes(tensors: Dict[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in tensors.items()}


def _misfits(expected: Dict[str, Tuple[int, ...]], found: Dict[str, Tuple[int, ...]]) -> str:
    """'' when `found` has exactly the tensor names and shapes `expected` has, else what differs (a few of each)."""
    def some(names) -> str:
        names = sorted(names)
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    missing, unexpected = set(expected) - set(found), set(found) - set(expected)
    reshaped = {name for name in set(expected) & set(found) if expected[name] != found[name]}
    problems = [f"{len(missing)} missing ({some(missing)})" if missing else "",
                f"{len(unexpected)} unexpected ({some(unexpected)})" if unexpected else "",
                "wrong shape: " + ", ".join(f"{name} {list(found[name])} instead of {list(expected[name])}"
                                            for name in sorted(reshaped)[:3]) if reshaped else ""]
    return "; ".join(problem for problem in problems if problem)
