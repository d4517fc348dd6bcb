"""`ct2x models list | download NAME | path NAME | import x2ct CHECKPOINT | info FILE`: the models ct2x knows, its
model cache, official checkpoints turned into model files, and what a model file holds.

Each action is a sub-parser whose `models_action` default is the function that runs it. Modules that import torch are
imported inside those functions, so `ct2x --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any, List, Tuple

from ct2x.models import cache_root, cache_state, cached_path, download, load_registry, read_header
from ct2x.models.cache import CACHE_ENV
from ct2x.text import size_text

INDENT = "  "
KEY_WIDTH = 16  # characters of the key column in `info`
CACHE_STATES = {"verified": "yes", "unverified": "yes (not verified yet)", "imported": "yes (imported)",
                "absent": "no"}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "models", help="list, download and inspect learned models",
        description="The learned models ct2x knows (its registry), its model cache and CT2X model files "
                    f"(.safetensors). Cache: ${CACHE_ENV}, else the platform's cache folder.")
    actions = parser.add_subparsers(dest="action_name", metavar="ACTION", required=True)

    actions.add_parser("list", help="the models ct2x knows, and which are in the cache").set_defaults(
        models_action=_list)

    fetch = actions.add_parser("download", help="download a model into the cache (once; SHA256-checked)")
    fetch.add_argument("name", metavar="NAME", help="model name, as `ct2x models list` shows it")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    fetch.set_defaults(models_action=_download)

    where = actions.add_parser("path", help="print the cached model file's path (or how to get it)")
    where.add_argument("name", metavar="NAME", help="model name, as `ct2x models list` shows it")
    where.set_defaults(models_action=_path)

    importer = actions.add_parser("import", help="turn an official checkpoint into a CT2X model file")
    importer.add_argument("family", choices=("x2ct",), help="whose checkpoint: x2ct (kylekma/X2CT, X2CT-GAN)")
    importer.add_argument("checkpoint", metavar="CHECKPOINT", help="the official .pth file, e.g. 90_net_G.pth")
    importer.add_argument("--variant", choices=("biplanar", "single"), required=True,
                          help="biplanar: X2CT-GAN+B (PA + lateral, 90_net_G.pth); single: +S (PA, 30_net_G.pth)")
    importer.add_argument("--out", required=True, metavar="MODEL", help="CT2X model file to write (.safetensors)")
    importer.set_defaults(models_action=_import)

    info = actions.add_parser("info", help="print what a model file holds: kind, conventions, metrics, licence")
    info.add_argument("file", metavar="FILE", help="CT2X model file (.safetensors)")
    info.set_defaults(models_action=_info)
    return parser


def run(args: argparse.Namespace) -> int:
    return args.models_action(args)


def _list(args: argparse.Namespace) -> int:
    rows = [("NAME", "KIND", "SIZE", "LICENCE", "CACHED", "DESCRIPTION")]
    by_hand = False
    for entry in load_registry().values():
        state = CACHE_STATES[cache_state(entry)]
        if entry.manual is not None and state == "no":
            state, by_hand = "no, by hand", True
        size = "-" if entry.size_bytes is None else size_text(entry.size_bytes)
        rows.append((entry.name, entry.kind, size, entry.license, state, entry.description))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    print(f"\ncache: {cache_root() / 'models'} (${CACHE_ENV} moves it)")
    if by_hand:
        print("Models marked 'by hand' cannot be downloaded automatically: `ct2x models path NAME` says how to get "
              "them.")
    return 0


def _download(args: argparse.Namespace) -> int:
    already = cache_state(args.name) == "verified"
    path = download(args.name, progress=not args.quiet)
    done = "was already in the cache" if already else f"downloaded ({size_text(path.stat().st_size)})"
    print(f"ct2x models download: {args.name} {done}, SHA256 verified: {path}")
    return 0


def _path(args: argparse.Namespace) -> int:
    print(cached_path(args.name))
    return 0


def _import(args: argparse.Namespace) -> int:
    from ct2x.models.x2ct_official import import_official_checkpoint

    path = import_official_checkpoint(args.checkpoint, args.variant, args.out)
    print(f"ct2x models import: {args.checkpoint} -> {path} (X2CT-GAN {args.variant}; GPL-3.0 weights: see "
          "`ct2x models info` for their terms)")
    return 0


def _info(args: argparse.Namespace) -> int:
    header = read_header(args.file)
    info = header.info
    values = sum(math.prod(shape) for shape, _ in header.tensors.values())
    dtypes = ", ".join(sorted({dtype for _, dtype in header.tensors.values()})) or "none"
    lines = [args.file] + _lines([
        ("kind", info.kind), ("description", info.description), ("licence", info.license),
        ("created by", f"{info.created_by} (model file format {info.format_version})"),
        ("tensors", f"{len(header.tensors)} holding {values:,} values ({dtypes})"),
        ("configuration", info.config), ("inputs", info.inputs), ("outputs", info.outputs),
        ("training data", info.training_data), ("metrics", info.metrics), ("source", info.source),
    ], depth=1)
    print("\n".join(lines))
    return 0


def _lines(items: List[Tuple[str, Any]], depth: int) -> List[str]:
    """'key  value' lines, a JSON object's entries indented beneath its key; strings as they are, other values as
    JSON."""
    lines = []
    for key, value in items:
        prefix = INDENT * depth + f"{key}".ljust(KEY_WIDTH - len(INDENT) * (depth - 1))
        if isinstance(value, dict) and value:
            lines.append(prefix.rstrip())
            lines.extend(_lines(list(value.items()), depth + 1))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            lines.append(f"{prefix} {text or '-'}".rstrip())
    return lines
