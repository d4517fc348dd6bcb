"""Checks of image files that ITK reads without complaint although they are damaged.

ITK's NIfTI reader fills a short file's missing voxels with zeros and turns NaN and inf into 0; these checks read the
file itself. After ITK fails to read a NRRD or MetaImage file, its header tells what is wrong (a missing or short
data file).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from ct2x.errors import CT2XInputError
from ct2x.io.formats import READ_FORMATS
from ct2x.text import size_text
from ct2x.volume import non_finite_error

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


def check_nifti(path: Path) -> None:
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
        raise incomplete_error(path, present, header.voxel_bytes, "voxel data", damage=damage)
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


def incomplete_error(
    path: Path, present: int, declared: int, what: str, data_file: Optional[Path] = None, damage: Optional[str] = None
) -> CT2XInputError:
    """The refusal of a file whose data is shorter than its header declares (or damaged part way)."""
    holder = f"its data file {data_file.name}" if data_file is not None and data_file != path else "it"
    problem = "is damaged" if damage is not None and present >= declared else "is incomplete"
    detail = f"; {damage}" if damage is not None else ""
    return CT2XInputError(
        f"{path}: {problem}: {holder} holds {size_text(present)} of the {size_text(declared)} of {what} its header "
        "declares "
        f"({math.floor(100 * present / declared)} %){detail}. Was a download or copy interrupted? Copy the file again."
    )


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


def explain_read_failure(path: Path, suffix: str, native: str) -> None:
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
        raise incomplete_error(path, int(metaio.group(2)), int(metaio.group(1)), "data")


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
        raise incomplete_error(path, present, declared, what, data_file=data_file, damage=damage)


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
