"""Read CT volumes (NIfTI, NRRD, MHA/MHD, DICOM series) into ``CTVolume`` and write images atomically.

Damaged input is refused, not rendered: files shorter than their header declares, damaged compression, non-finite
voxels (ITK's NIfTI reader would read all of these as zeros), a zero NIfTI voxel size, and DICOM files that GDCM
skips (named when their slices are missing). What ITK prints on stderr while reading becomes CT2XWarning or part of
the refusal instead of reaching the terminal.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
import SimpleITK as sitk

from ct2x.errors import CT2XInputError, CT2XWarning
from ct2x.volume import CTVolume, check_stored_values, non_finite_error

PathLike = Union[str, os.PathLike]
T = TypeVar("T")

READ_FORMATS = {  # file suffix -> format name
    ".nii": "NIfTI",
    ".nii.gz": "NIfTI",
    ".nrrd": "NRRD",
    ".nhdr": "NRRD",
    ".mha": "MetaImage",
    ".mhd": "MetaImage",
}
SUPPORTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a folder holding a DICOM series"
SLICE_SPACING_RTOL = 0.01  # DICOM slice positions may deviate this much (relative) from even spacing
CHUNK_BYTES = 1 << 22  # files are checked in pieces of this many (decompressed) bytes
GZIP_MAGIC = b"\x1f\x8b"
GZIP_WBITS = zlib.MAX_WBITS | 16  # zlib.decompressobj: gzip container (NIfTI .gz, NRRD gzip encoding)
ZLIB_WBITS = zlib.MAX_WBITS  # zlib container (MetaImage CompressedData)
NIFTI_BYTES_PER_VOXEL = {  # NIfTI datatype code -> bytes per voxel
    2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8, 1536: 16, 1792: 16,
    2048: 32, 2304: 4,
}
NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # datatype code -> numpy type whose NaN and inf nifticlib turns into 0
METAIMAGE_BYTES_PER_VALUE = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4, "MET_LONG": 4,
    "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}
NRRD_BYTES_PER_VALUE = {
    name: size
    for size, names in (
        (1, "signed char|int8|int8_t|uchar|unsigned char|uint8|uint8_t"),
        (2, "short|short int|signed short|signed short int|int16|int16_t|ushort|unsigned short|unsigned short int|"
            "uint16|uint16_t"),
        (4, "int|signed int|int32|int32_t|uint|unsigned int|uint32|uint32_t|float"),
        (8, "longlong|long long|long long int|signed long long|signed long long int|int64|int64_t|ulonglong|"
            "unsigned long long|unsigned long long int|uint64|uint64_t|double"),
    )
    for name in names.split("|")
}
ITK_WARNING = re.compile(r"WARNING: In [^\n]*, line \d+\n(\w+) \(0x[0-9a-fA-F]+\): (.*?)(?:\n\s*\n|\Z)", re.S)
ITK_WARNINGS_HANDLED = {  # part of an ITK warning -> what CT2X says instead ("" = nothing: CT2X checks it itself)
    "Non uniform sampling or missing slices": "",  # _check_even_slice_spacing judges the slice positions
    "unexpected scales in sform": "its sform and its pixdim disagree on the voxel size; the spacing is taken from "
                                  "pixdim, so check it",
}
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
MAX_NAMED_FILES = 5


def load_ct(path: PathLike, series_uid: Optional[str] = None, stored_values: str = "auto") -> CTVolume:
    """Load a CT in Hounsfield units from an image file or a DICOM series folder.

    Any integer or float storage becomes float32 HU (SimpleITK applies DICOM rescale slope/intercept).

    Args:
        path: .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd file, or a folder with DICOM files (not searched recursively).
        series_uid: SeriesInstanceUID to load when the folder holds several series (see ``list_dicom_series``).
        stored_values: "auto" (HU, or HU + 1024 recognised and converted with a CT2XWarning), "hu" (use the values
            as they are) or "hu+1024" (subtract 1024); see ``ct2x.volume.interpret_stored_values``. The volume's
            ``stored_offset_hu`` records the conversion.
    """
    path = Path(path).expanduser()
    check_stored_values(stored_values)  # before a long read
    _check_readable(path)
    if path.is_dir():
        return _load_dicom_series(path, series_uid, stored_values)
    if series_uid is not None:
        raise CT2XInputError(f"{path}: series_uid is only for DICOM folders; pass the folder or leave it out.")
    suffix = _format_suffix(path)
    if suffix not in READ_FORMATS:
        raise CT2XInputError(
            f"{path}: unknown format {suffix or '(no extension)'!r}; supported: {SUPPORTED}. "
            "For DICOM, pass the folder that holds the series, not one file."
        )
    if READ_FORMATS[suffix] == "NIfTI":
        _check_nifti(path)
    image, failure, native = _quietly(partial(sitk.ReadImage, str(path)))
    if failure is not None:
        _explain_read_failure(path, suffix, native)
        raise CT2XInputError(
            f"{path}: could not be read as {READ_FORMATS[suffix]} ({_sitk_reason(failure)}); is the file complete and "
            f"really {READ_FORMATS[suffix]}? Supported: {SUPPORTED}."
        )
    _warn_native_output(native, str(path))
    return CTVolume.from_sitk(image, source=str(path), stored_values=stored_values)


def list_dicom_series(folder: PathLike) -> List[Tuple[str, int, str]]:
    """(SeriesInstanceUID, number of files, SeriesDescription or "") of each DICOM series directly in ``folder``."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CT2XInputError(f"{folder}: is not a folder; pass the folder that holds the DICOM files.")
    return [(uid, len(files), _series_description(files[0])) for uid, files in _dicom_series_files(folder).items()]


def _check_readable(path: Path) -> None:
    """Refuse a path that does not exist or that this user may not read, saying which."""
    try:
        path.stat()
    except PermissionError:
        raise CT2XInputError(
            f"{path}: permission denied: a folder on its path may not be searched by this user; check the folders' "
            "permissions."
        ) from None
    except OSError:
        raise CT2XInputError(f"{path}: does not exist; check the path (supported: {SUPPORTED}).") from None
    needed = os.R_OK | os.X_OK if path.is_dir() else os.R_OK
    if not os.access(path, needed):
        kind = "folder" if path.is_dir() else "file"
        raise CT2XInputError(
            f"{path}: permission denied: this user may not read the {kind}; change its permissions or ask its owner."
        )


# NIfTI: ITK's reader fills a short file's missing voxels with zeros, and its nifticlib (nifti_read_buffer) turns
# NaN and inf in float data into 0; both are checked on the file itself, in one pass over its (decompressed) bytes.


@dataclass(frozen=True)
class _NiftiHeader:
    """What the checks need from a NIfTI-1 or NIfTI-2 header; axes in the file's order (i, j, k, ...)."""

    version: int
    byte_order: str  # struct / numpy prefix, "<" or ">"
    shape: Tuple[int, ...]  # dim[1..dim[0]]
    datatype: int
    pixdim: Tuple[float, ...]  # pixdim[1..dim[0]], mm along the spatial axes
    data_offset: int  # bytes before the voxel data
    sform_code: int
    sform_voxel_mm: Tuple[float, float, float]  # lengths of the sform's i, j, k columns

    @property
    def voxel_bytes(self) -> Optional[int]:
        """Bytes of voxel data the header declares (None for an unknown datatype)."""
        size = NIFTI_BYTES_PER_VOXEL.get(self.datatype)
        return None if size is None else size * math.prod(self.shape)


def _parse_nifti_header(head: bytes) -> Optional[_NiftiHeader]:
    """The header at the start of ``head`` (either byte order), or None if it is no single-file NIfTI-1/-2 header."""
    for order in "<>":
        if len(head) >= 348 and struct.unpack_from(order + "i", head)[0] == 348 and head[344:347] == b"n+1":
            dim = struct.unpack_from(order + "8h", head, 40)
            datatype = struct.unpack_from(order + "h", head, 70)[0]
            pixdim = struct.unpack_from(order + "8f", head, 76)
            vox_offset = struct.unpack_from(order + "f", head, 108)[0]
            sform_code = struct.unpack_from(order + "h", head, 254)[0]
            srow = np.array(struct.unpack_from(order + "12f", head, 280)).reshape(3, 4)  # (3, 4) voxel -> mm
            version, header_bytes = 1, 348
        elif len(head) >= 540 and struct.unpack_from(order + "i", head)[0] == 540 and head[4:7] == b"n+2":
            dim = struct.unpack_from(order + "8q", head, 16)
            datatype = struct.unpack_from(order + "h", head, 12)[0]
            pixdim = struct.unpack_from(order + "8d", head, 104)
            vox_offset = struct.unpack_from(order + "q", head, 168)[0]
            sform_code = struct.unpack_from(order + "i", head, 348)[0]
            srow = np.array(struct.unpack_from(order + "12d", head, 400)).reshape(3, 4)
            version, header_bytes = 2, 540
        else:
            continue
        n_axes = dim[0]
        if not 1 <= n_axes <= 7 or min(dim[1:n_axes + 1]) < 1:
            return None
        return _NiftiHeader(
            version=version,
            byte_order=order,
            shape=tuple(int(n) for n in dim[1:n_axes + 1]),
            datatype=int(datatype),
            pixdim=tuple(float(d) for d in pixdim[1:n_axes + 1]),
            data_offset=max(int(vox_offset) if math.isfinite(vox_offset) else 0, header_bytes),
            sform_code=int(sform_code),
            sform_voxel_mm=tuple(float(v) for v in np.linalg.norm(srow[:, :3], axis=0)),
        )
    return None


def _check_nifti(path: Path) -> None:
    """Refuse a NIfTI file that is short, has damaged gzip data, holds NaN or inf, or has a zero voxel size."""
    gzipped = _starts_with(path, GZIP_MAGIC)
    with contextlib.closing(_nifti_chunks(path)) as chunks:
        head = b""
        try:
            while len(head) < 540:
                head += next(chunks)
        except StopIteration:
            pass  # a file shorter than a NIfTI-2 header
        except _DamagedStream as damage:
            raise CT2XInputError(f"{path}: could not be read as NIfTI: {damage}. Copy the file again.") from None
        header = _parse_nifti_header(head)
        if header is None or header.voxel_bytes is None:
            return  # not a header these checks understand: ITK decides
        _check_nifti_voxel_size(path, header)
        float_type = NIFTI_FLOAT_TYPES.get(header.datatype)
        if gzipped or float_type is not None:
            dtype = None if float_type is None else np.dtype(header.byte_order + float_type)
            present, non_finite, damage = _scan_voxel_data(chain([head], chunks), header.data_offset,
                                                           header.voxel_bytes, dtype)
        else:  # integers in a plain file: its size tells
            present = min(max(path.stat().st_size - header.data_offset, 0), header.voxel_bytes)
            non_finite, damage = (0, 0, 0), None
    if damage is not None or present < header.voxel_bytes:
        raise _incomplete(path, present, header.voxel_bytes, "voxel data", damage=damage)
    if sum(non_finite):
        raise non_finite_error(str(path), *non_finite, math.prod(header.shape))


def _check_nifti_voxel_size(path: Path, header: _NiftiHeader) -> None:
    """ITK takes the spacing from pixdim and reads 0 as 1 mm, which would silently distort the volume."""
    for n, (size, pixdim) in enumerate(zip(header.shape[:3], header.pixdim[:3])):
        if size > 1 and not (math.isfinite(pixdim) and pixdim != 0.0):
            axis = "ijk"[n]
            sform = header.sform_voxel_mm[n]
            hint = f"; its sform suggests {sform:.4g} mm" if header.sform_code > 0 and sform > 0 else ""
            raise CT2XInputError(
                f"{path}: its header gives no voxel size along {axis} (pixdim[{n + 1}] = {pixdim:g}{hint}), so the "
                f"{'slice ' if axis == 'k' else ''}spacing is unknown; ITK would read it as 1 mm and distort the "
                "volume. Set the true spacing in the header (e.g. in 3D Slicer: Volumes module, Volume Information, "
                "Image Spacing, then save the volume) or convert the original scan again."
            )


def _scan_voxel_data(
    chunks: Iterable[bytes], offset: int, voxel_bytes: int, dtype: Optional[np.dtype]
) -> Tuple[int, Tuple[int, int, int], Optional[str]]:
    """(voxel bytes present, (NaN, +inf, -inf) counts when ``dtype`` is given, damage or None) from a file's bytes.

    Reads to the end of ``chunks`` so that gzip verifies its checksum.
    """
    position, present, carry = 0, 0, b""
    n_nan = n_pos_inf = n_neg_inf = 0
    try:
        for chunk in chunks:
            lo, hi = max(offset - position, 0), min(offset + voxel_bytes - position, len(chunk))
            position += len(chunk)
            if hi <= lo:
                continue
            present += hi - lo
            if dtype is not None:
                data = carry + chunk[lo:hi]
                usable = len(data) - len(data) % dtype.itemsize
                values = np.frombuffer(data, dtype=dtype, count=usable // dtype.itemsize)
                carry = data[usable:]
                if not np.all(np.isfinite(values)):
                    n_nan += int(np.count_nonzero(np.isnan(values)))
                    n_pos_inf += int(np.count_nonzero(values == np.inf))
                    n_neg_inf += int(np.count_nonzero(values == -np.inf))
    except _DamagedStream as damage:
        return present, (n_nan, n_pos_inf, n_neg_inf), str(damage)
    return present, (n_nan, n_pos_inf, n_neg_inf), None


def _nifti_chunks(path: Path) -> Iterator[bytes]:
    """The bytes of a .nii or .nii.gz file, decompressed (ITK also reads a .nii.gz that is not compressed)."""
    return _inflated_chunks(path, 0, GZIP_WBITS) if _starts_with(path, GZIP_MAGIC) else _file_chunks(path)


class _DamagedStream(Exception):
    """Compressed data that is cut short or corrupt; the message says which."""


def _file_chunks(path: Path, offset: int = 0) -> Iterator[bytes]:
    with open(path, "rb") as file:
        file.seek(offset)
        yield from iter(partial(file.read, CHUNK_BYTES), b"")


def _inflated_chunks(path: Path, offset: int, wbits: int) -> Iterator[bytes]:
    """Decompressed bytes of the gzip (all members) or zlib data from ``offset``; raises _DamagedStream."""
    kind = "gzip" if wbits == GZIP_WBITS else "zlib"
    decompressor = zlib.decompressobj(wbits)
    started = False  # the current stream has had input
    for data in _file_chunks(path, offset):
        while True:
            try:
                out = decompressor.decompress(data, CHUNK_BYTES)
            except zlib.error as error:
                raise _DamagedStream(f"its {kind} data is damaged ({error})") from None
            started = started or bool(data)
            if out:
                yield out
            if decompressor.eof:
                data = decompressor.unused_data
                if not (wbits == GZIP_WBITS and data.startswith(GZIP_MAGIC)):
                    return  # the end, or trailing bytes that are not another gzip member (ignored, as zlib does)
                decompressor, started = zlib.decompressobj(wbits), False
            else:
                data = decompressor.unconsumed_tail
                if not data and len(out) < CHUNK_BYTES:
                    break
    if started:
        raise _DamagedStream(f"its {kind} data is cut short")


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as file:
        return file.read(len(magic)) == magic


def _incomplete(
    path: Path, present: int, declared: int, what: str, data_file: Optional[Path] = None, damage: Optional[str] = None
) -> CT2XInputError:
    """The refusal of a file whose data is shorter than its header declares (or damaged part way)."""
    holder = f"its data file {data_file.name}" if data_file is not None and data_file != path else "it"
    problem = "is damaged" if damage is not None and present >= declared else "is incomplete"
    detail = f"; {damage}" if damage is not None else ""
    return CT2XInputError(
        f"{path}: {problem}: {holder} holds {_size(present)} of the {_size(declared)} of {what} its header declares "
        f"({math.floor(100 * present / declared)} %){detail}. Was a download or copy interrupted? Copy the file again."
    )


def _size(n_bytes: int) -> str:
    """Bytes in decimal units: 950 bytes, 65.5 kB, 12.1 MB, 1.2 GB."""
    if n_bytes < 1000:
        return f"{n_bytes} bytes"
    for unit, scale in (("kB", 1e3), ("MB", 1e6), ("GB", 1e9)):
        if n_bytes < 1000 * scale or unit == "GB":
            return f"{n_bytes / scale:.1f} {unit}"
    raise AssertionError("unreachable")


# After ITK fails to read a file: say what is wrong with it, from its header.


@dataclass(frozen=True)
class _DataLayout:
    """Where a header (MetaImage, NRRD) says its voxel data lies, and how much there is."""

    data_file: Path  # the header file itself when the data is attached
    header_field: str  # the header's name for the data file, for messages
    offset: int  # bytes before the data in data_file; -1: the data ends the file
    voxel_bytes: int  # uncompressed
    wbits: Optional[int]  # compression (GZIP_WBITS or ZLIB_WBITS), None when raw
    compressed_bytes: Optional[int]  # declared size of the compressed data, when the header gives it


def _explain_read_failure(path: Path, suffix: str, native: str) -> None:
    """Raise a CT2XInputError saying why ITK could not read ``path`` when the file shows it; else return."""
    layout = None
    with contextlib.suppress(ValueError, KeyError, OSError, UnicodeDecodeError):
        if suffix in (".mha", ".mhd"):
            layout = _metaimage_layout(path)
        elif suffix in (".nrrd", ".nhdr"):
            layout = _nrrd_layout(path)
    if layout is not None:
        _check_data_present(path, layout)
    if READ_FORMATS[suffix] == "NIfTI":
        header = None
        with contextlib.closing(_nifti_chunks(path)) as chunks, contextlib.suppress(_DamagedStream):
            header = _parse_nifti_header(next(chunks, b""))
        if header is not None and header.version == 2:
            raise CT2XInputError(
                f"{path}: is NIfTI-2, which SimpleITK {sitk.Version.VersionString()} cannot read; save it as NIfTI-1 "
                "(.nii, .nii.gz) or NRRD first."
            )
    metaio = re.search(r"ideal = (\d+) : actual = (\d+)", native)  # MetaIO's report of a short read
    if metaio:
        raise _incomplete(path, int(metaio.group(2)), int(metaio.group(1)), "data")


def _check_data_present(path: Path, layout: _DataLayout) -> None:
    """Refuse when the data file is missing, unreadable, short or damaged."""
    data_file = layout.data_file
    if data_file != path and not data_file.is_file():
        raise CT2XInputError(
            f"{path}: its voxel data file {data_file} ({layout.header_field} in the header) does not exist; keep the "
            "data file next to the header, or correct its name in the header."
        )
    if not os.access(data_file, os.R_OK):
        raise CT2XInputError(f"{path}: permission denied: this user may not read its voxel data file {data_file}.")
    if layout.wbits is not None and layout.offset < 0:
        return  # compressed data "at the end of the file" has no size to check against
    available = data_file.stat().st_size - max(layout.offset, 0)  # bytes; offset -1: the data ends the file
    if layout.wbits is None:
        present, declared, what, damage = min(available, layout.voxel_bytes), layout.voxel_bytes, "voxel data", None
    elif layout.compressed_bytes is not None and available < layout.compressed_bytes:
        present, declared, what, damage = available, layout.compressed_bytes, "compressed voxel data", None
    else:
        declared, what = layout.voxel_bytes, "voxel data"
        present, _, damage = _scan_voxel_data(_inflated_chunks(data_file, layout.offset, layout.wbits), 0,
                                              declared, None)
    if damage is not None or present < declared:
        raise _incomplete(path, present, declared, what, data_file=data_file, damage=damage)


def _header_fields(path: Path, separator: str, last_field: Optional[str]) -> Tuple[Dict[str, str], int]:
    """Text header fields ("key<separator>value" lines, keys lower-case) and the header's length in bytes.

    The header ends after the ``last_field`` line, or at the first empty line.
    """
    with open(path, "rb") as file:
        head = file.read(1 << 16)
    fields: Dict[str, str] = {}
    length = 0
    for line in head.splitlines(keepends=True):
        length += len(line)
        text = line.decode("ascii").strip()
        if not text:
            break
        key, found, value = text.partition(separator)
        if found:
            fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == last_field:
            break
    return fields, length


def _metaimage_layout(path: Path) -> Optional[_DataLayout]:
    fields, header_bytes = _header_fields(path, "=", last_field="elementdatafile")
    if fields.get("binarydata", "true").lower() != "true":
        return None
    voxel_bytes = (math.prod(int(n) for n in fields["dimsize"].split())
                   * int(fields.get("elementnumberofchannels", "1"))
                   * METAIMAGE_BYTES_PER_VALUE[fields["elementtype"].upper()])
    compressed = fields.get("compresseddata", "false").lower() == "true"
    name = fields["elementdatafile"]
    if name.upper() == "LOCAL":
        data_file, offset = path, header_bytes
    elif name.upper().startswith("LIST") or "%" in name or " " in name:
        return None  # one file per slice
    else:
        data_file, offset = path.parent / name, int(fields.get("headersize", "0"))
    return _DataLayout(
        data_file=data_file, header_field="ElementDataFile", offset=offset, voxel_bytes=voxel_bytes,
        wbits=ZLIB_WBITS if compressed else None,
        compressed_bytes=int(fields["compresseddatasize"]) if compressed and "compresseddatasize" in fields else None,
    )


def _nrrd_layout(path: Path) -> Optional[_DataLayout]:
    if not _starts_with(path, b"NRRD"):
        return None
    fields, header_bytes = _header_fields(path, ":", last_field=None)
    fields = {key.replace(" ", ""): value.lstrip("=").strip() for key, value in fields.items()}
    encoding = fields.get("encoding", "raw")
    if encoding not in ("raw", "gzip", "gz") or int(fields.get("lineskip", "0")) != 0:
        return None
    voxel_bytes = math.prod(int(n) for n in fields["sizes"].split()) * NRRD_BYTES_PER_VALUE[fields["type"]]
    name = fields.get("datafile")
    if name is None:
        data_file = path
    elif name.upper().startswith("LIST") or "%" in name or " " in name:
        return None  # one file per slice
    else:
        data_file = path.parent / name
    skip = int(fields.get("byteskip", "0"))
    offset = (header_bytes if data_file == path else 0) + skip if skip >= 0 else -1
    return _DataLayout(data_file=data_file, header_field="data file", offset=offset, voxel_bytes=voxel_bytes,
                       wbits=None if encoding == "raw" else GZIP_WBITS, compressed_bytes=None)


# What ITK, MetaIO and GDCM print on stderr: kept off the terminal, turned into CT2X's own messages.


def _quietly(action: Callable[[], T]) -> Tuple[Optional[T], Optional[RuntimeError], str]:
    """(result or None, RuntimeError or None, what C++ code printed on stderr meanwhile) of a SimpleITK call."""
    result, failure = None, None
    with _native_stderr_captured() as captured:
        try:
            result = action()
        except RuntimeError as error:
            failure = error
    return result, failure, "".join(captured)


@contextlib.contextmanager
def _native_stderr_captured() -> Iterator[List[str]]:
    """Redirect file descriptor 2 (where ITK, MetaIO and GDCM print) into a temporary file; the list gets its text."""
    captured: List[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):  # no stderr (e.g. a GUI without console): nothing to keep off
        yield captured
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


def _warn_native_output(native: str, source: str) -> None:
    """Each distinct warning ITK printed while reading ``source`` as a CT2XWarning (see ITK_WARNINGS_HANDLED)."""
    reports = [(reporter, " ".join(text.split())) for reporter, text in ITK_WARNING.findall(native)]
    rest = " ".join(ITK_WARNING.sub("", native).split())
    if rest:
        reports.append(("the reader", rest))
    for reporter, text in dict.fromkeys(reports):
        handled = [said for part, said in ITK_WARNINGS_HANDLED.items() if part in text]
        if handled and not handled[0]:
            continue
        said = handled[0] if handled else f"{reporter} reported: {text}"
        warnings.warn(f"{source}: {said}.", CT2XWarning, stacklevel=3)


def _sitk_reason(error: RuntimeError) -> str:
    """The last line of a SimpleITK exception, without the C++ source location."""
    return str(error).strip().splitlines()[-1].replace("sitk::ERROR: ", "")


def _format_suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


# DICOM series


def _dicom_series_files(folder: Path) -> Dict[str, List[str]]:
    """SeriesInstanceUID -> its files (sorted by GDCM along the slice axis), for the series directly in ``folder``."""
    def scan() -> Dict[str, List[str]]:
        return {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
                for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))}

    series, failure, _ = _quietly(scan)
    if failure is not None:
        raise CT2XInputError(f"{folder}: the folder could not be scanned for DICOM files ({_sitk_reason(failure)}).")
    return series


def _load_dicom_series(folder: Path, series_uid: Optional[str], stored_values: str) -> CTVolume:
    series_files = _dicom_series_files(folder)
    series = [(uid, len(files), _series_description(files[0])) for uid, files in series_files.items()]
    if not series:
        n_files = sum(1 for p in folder.iterdir() if p.is_file())
        subfolders = [p.name for p in folder.iterdir() if p.is_dir()]
        hint = f" Subfolders are not searched: {', '.join(subfolders[:5])}." if subfolders else ""
        damaged = _unreadable_dicom_files(folder, series_files)
        damaged_text = f" Files that look like DICOM but could not be read: {damaged}." if damaged else ""
        raise CT2XInputError(
            f"{folder}: folder holds no DICOM series ({n_files} files).{hint}{damaged_text} Pass a folder with DICOM "
            f"files or an image file ({SUPPORTED})."
        )
    uids = [uid for uid, _, _ in series]
    if series_uid is None and len(series) > 1:
        raise CT2XInputError(
            f"{folder}: folder holds {len(series)} DICOM series; pass series_uid=... to choose one of:\n"
            + _describe_series(series)
        )
    if series_uid is not None and series_uid not in uids:
        raise CT2XInputError(
            f"{folder}: no DICOM series with series_uid={series_uid!r}; the folder holds:\n" + _describe_series(series)
        )
    uid = uids[0] if series_uid is None else series_uid
    source = f"{folder} (DICOM series {uid})" if len(series) > 1 else str(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series_files[uid])
    reader.MetaDataDictionaryArrayUpdateOn()  # per-slice tags, to check the slice positions below
    image, failure, native = _quietly(reader.Execute)
    if failure is not None:
        damaged = _unreadable_dicom_files(folder, series_files)
        raise CT2XInputError(
            f"{source}: the DICOM series could not be read ({_sitk_reason(failure)})."
            + (f" Files that look like DICOM but could not be read: {damaged}." if damaged else "")
        )
    _check_even_slice_spacing(reader, image, source, partial(_unreadable_dicom_files, folder, series_files))
    _warn_native_output(native, source)
    left_out = _unreadable_dicom_files(folder, series_files)
    if left_out:  # e.g. a damaged first or last slice: the volume is shorter but evenly spaced
        warnings.warn(
            f"{source}: these files in the folder look like DICOM but are in no series (damaged, truncated or not "
            f"images), so the volume was built without them: {left_out}.",
            CT2XWarning,
            stacklevel=3,
        )
    return CTVolume.from_sitk(image, source=source, stored_values=stored_values)


def _check_even_slice_spacing(
    reader: sitk.ImageSeriesReader, image: sitk.Image, source: str, unreadable_files: Callable[[], str]
) -> None:
    """ITK takes the slice spacing from the first two slices; missing slices would silently distort the volume.

    ``unreadable_files`` names the folder's damaged DICOM files (GDCM leaves them out of the series), if any.
    """
    n_slices = image.GetSize()[2]
    if n_slices < 3 or not all(reader.HasMetaDataKey(s, "0020|0032") for s in range(n_slices)):
        return
    positions = np.array(
        [[float(v) for v in reader.GetMetaData(s, "0020|0032").split("\\")] for s in range(n_slices)]
    )  # (n_slices, 3) ImagePositionPatient, LPS mm
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]  # (3,) LPS unit vector along k
    gaps = np.diff(positions @ normal)  # (n_slices - 1,) mm between neighbouring slices
    if np.allclose(gaps, image.GetSpacing()[2], rtol=SLICE_SPACING_RTOL, atol=1e-3):
        return
    problem = f"{source}: DICOM slices are not evenly spaced (gaps {gaps.min():.3g} to {gaps.max():.3g} mm)"
    damaged = unreadable_files()
    if damaged:
        raise CT2XInputError(
            f"{problem}: slices are missing. These files in the folder look like DICOM but could not be read, "
            f"probably the missing slices: {damaged}. Replace them with intact copies (copy or export the series "
            "again)."
        )
    raise CT2XInputError(
        f"{problem}: slices are missing or several acquisitions are mixed. Load the series in Slicer's DICOM module "
        "(it regularises such series), save it as NRRD and load that."
    )


def _unreadable_dicom_files(folder: Path, series_files: Dict[str, List[str]]) -> str:
    """The files directly in ``folder`` that look like DICOM but are in no series (GDCM could not read them), described.

    A file looks like DICOM by its DICOM preamble or its name (.dcm, .dicom, .ima or no suffix; DICOMDIR aside).
    """
    in_series = {Path(name).name for files in series_files.values() for name in files}
    found: List[Tuple[Path, str]] = []  # (file, problem; "" for damaged or truncated)
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name not in in_series):
        dicom_name = path.suffix.lower() in DICOM_SUFFIXES or (not path.suffix and path.name.upper() != "DICOMDIR")
        if not os.access(path, os.R_OK):
            if dicom_name:
                found.append((path, "permission denied"))
        elif path.stat().st_size == 0:
            if dicom_name:
                found.append((path, "empty"))
        elif (dicom_name and path.suffix) or (_has_dicom_preamble(path) and path.name.upper() != "DICOMDIR"):
            found.append((path, ""))
    if not found:
        return ""
    sizes = [os.path.getsize(name) for files in series_files.values() for name in files]
    typical = f", the series' files {_size(int(np.median(sizes)))}" if sizes else ""
    described = [f"{path.name} ({problem or f'{_size(path.stat().st_size)}{typical}: damaged or truncated'})"
                 for path, problem in found]
    if len(described) > MAX_NAMED_FILES:
        described[MAX_NAMED_FILES:] = [f"and {len(described) - MAX_NAMED_FILES} more"]
    return ", ".join(described)


def _has_dicom_preamble(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(132)[128:] == b"DICM"


def _describe_series(series: Sequence[Tuple[str, int, str]]) -> str:
    return "\n".join(
        f"  series_uid={uid!r}: {n_files} files" + (f", {description!r}" if description else "")
        for uid, n_files, description in series
    )


def _series_description(dicom_file: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(dicom_file)
    _, failure, _ = _quietly(reader.ReadImageInformation)
    if failure is not None:
        return ""
    return reader.GetMetaData("0008|103e").strip() if reader.HasMetaDataKey("0008|103e") else ""


def save_image(
    image: np.ndarray,
    path: PathLike,
    spacing_mm: Union[float, Sequence[float]],
    origin_mm: Optional[Sequence[float]] = None,
) -> Path:
    """Write a 2-D (rows, columns) or 3-D (K, J, I) array as float32 NRRD or MHA (chosen by extension).

    Args:
        image: array in KJI order: a 2-D image is (J, I) = (rows, columns).
        path: destination ending in .nrrd or .mha; written atomically.
        spacing_mm: pixel spacing in mm, one number or one per axis in (i, j[, k]) order (columns first).
        origin_mm: position of pixel 0 written as-is into the header (no RAS/LPS conversion; for CTs use
            ``save_ct``); default zeros.
    """
    array = np.asarray(image, dtype=np.float32)
    if array.ndim not in (2, 3):
        raise CT2XInputError(f"save_image: image must be 2-D or 3-D, got shape {array.shape}.")
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (array.ndim,))  # (ndim,) mm, i first
    if not np.all(spacing > 0):
        raise CT2XInputError(f"save_image: spacing_mm must be positive, got {spacing_mm}.")
    sitk_image = sitk.GetImageFromArray(array)
    sitk_image.SetSpacing(spacing.tolist())
    if origin_mm is not None:
        sitk_image.SetOrigin([float(v) for v in origin_mm])
    return _write_atomic(sitk_image, path, allowed=(".nrrd", ".mha"))


def save_png(image: np.ndarray, path: PathLike) -> Path:
    """Write a (rows, columns) uint8 image as an 8-bit greyscale PNG, atomically (no imaging library needed)."""
    array = np.asarray(image)
    if array.ndim != 2 or array.dtype != np.uint8:
        raise CT2XInputError(f"save_png: image must be 2-D uint8, got shape {array.shape} of {array.dtype}.")
    return _write_atomic(sitk.GetImageFromArray(array), path, allowed=(".png",))


def save_ct(volume: CTVolume, path: PathLike) -> Path:
    """Write a CTVolume as float32 HU with its geometry (.nrrd, .mha, .nii or .nii.gz; written atomically).

    The round trip through ``load_ct`` is exact for NRRD and MHA; NIfTI stores geometry in float32 (~1e-6 mm).
    """
    return _write_atomic(volume.to_sitk(), path, allowed=(".nrrd", ".mha", ".nii", ".nii.gz"))


def _write_atomic(image: sitk.Image, path: PathLike, allowed: Sequence[str]) -> Path:
    """Write to a temporary file next to ``path``, then rename it, so a failure leaves nothing half-written.

    The file gets the ordinary mode for new files (0o666 less the umask). A failure inside SimpleITK becomes an
    OSError naming the file and the likely cause (errno kept or inferred, e.g. ENOSPC).
    """
    path = Path(path).expanduser()
    suffix = _format_suffix(path)
    if suffix not in allowed:
        raise CT2XInputError(f"{path}: cannot write {suffix or '(no extension)'!r}; use one of {', '.join(allowed)}.")
    if not path.parent.is_dir():
        raise CT2XInputError(f"{path}: folder {path.parent} does not exist; create it first.")
    fd, tmp_name = tempfile.mkstemp(suffix=suffix, prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        _, failure, native = _quietly(partial(sitk.WriteImage, image, tmp_name, useCompression=True))
        if failure is not None:
            raise _write_error(path, image, f"{_sitk_reason(failure)} {native}")
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp made it 0o600
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process's umask (set and restored: os has no way to only read it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_error(path: Path, image: sitk.Image, reason: str) -> OSError:
    """An OSError for a failed write: errno from the reason's text, else ENOSPC when the disk is too full, else EIO."""
    needed = image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:  # the folder itself is gone or unreachable
        free = None
    causes = {
        errno.ENOSPC: "the disk is full" + ("" if free is None else f" ({_size(free)} free, the image needs up to "
                                                                     f"{_size(needed)})")
                      + "; free some space or write elsewhere",
        errno.EACCES: "permission denied; choose a folder this user may write to",
        errno.EROFS: "the file system is read-only; write elsewhere",
        errno.EFBIG: "the file is too large for this file system; write elsewhere",
    }
    if hasattr(errno, "EDQUOT"):
        causes[errno.EDQUOT] = "the disk quota is exceeded; free some space or write elsewhere"
    code = next((code for code in causes if os.strerror(code).lower() in reason.lower()), None)
    if code is None:
        code = errno.ENOSPC if free is not None and free < needed else errno.EIO
    cause = causes.get(code, "the write failed; is the disk full, removed or failing?")
    return OSError(code, f"{path}: could not be written: {cause} (SimpleITK: {' '.join(reason.split())}).")
