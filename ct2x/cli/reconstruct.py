"""`ct2x reconstruct --pa FILE [--lateral FILE] --model MODEL --out CT`: a CT from real X-ray films with an X2CT model.

Writes the CT (float32 HU in the X2CT cube's geometry, centred on RAS (0, 0, 0); NRRD, NIfTI or MHA by the name's
ending) and beside it `<name>_network_input.png`, the films exactly as the network reads them (PA, then lateral).
Every decision taken on the films is printed on stderr; every input is checked before anything is written, and a
failure leaves neither file behind.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Tuple

from ct2x.cli.options import option
from ct2x.errors import CT2XInputError
from ct2x.precision import PRECISIONS

CT_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha")
PICTURE_SUFFIX = "_network_input.png"
PROG = "ct2x reconstruct"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "reconstruct", help="reconstruct a CT from X-ray films (PA and lateral) with an X2CT model",
        description="Reconstruct a chest CT from a posterior-anterior film and, for biplanar models, a lateral film "
                    "(PNG, JPEG or DICOM; grey, RGB or RGBA; any size) with an X2CT model file. The films are "
                    "turned into the model's film convention (bone bright, cropped to the body, square, the lateral "
                    "facing image left) and every decision is printed.")
    parser.add_argument("--pa", required=True, metavar="FILE",
                        help="posterior-anterior (or AP) film, displayed radiologically: the patient's left on the "
                             "image right")
    parser.add_argument("--lateral", metavar="FILE", help="lateral film, facing either way (biplanar models)")
    parser.add_argument("--model", required=True, metavar="MODEL",
                        help="CT2X model file (.safetensors) of a films -> CT network (X2CT-GAN, CVAA-GAN), or a "
                             "model name from `ct2x models list`")
    parser.add_argument("--out", required=True, metavar="CT",
                        help=f"the CT to write: {', '.join(CT_SUFFIXES)}; the network's input goes beside it as "
                             f"NAME{PICTURE_SUFFIX}")
    parser.add_argument("--invert", choices=("auto", "yes", "no"), default="auto",
                        help="whether the films show bone dark and must be turned over (default %(default)s: DICOM's "
                             "MONOCHROME1, else detected from the anatomy)")
    parser.add_argument("--lateral-facing", choices=("auto", "left", "right"), default="auto",
                        help="the side of the lateral film the patient's front faces (default %(default)s: detected; "
                             "the spine's side is the brighter)")
    parser.add_argument("--crop", choices=("auto", "none"), default="auto",
                        help="auto: cut uniform borders and the air around the body; none: the whole film "
                             "(default %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N (default %(default)s)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32, or bf16: bfloat16 for the 3-D part, about twice as fast on CPUs with AVX-512 BF16 "
                             "and on GPUs, within 1 %% of fp32 on trained models (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing CT and picture of that name")
    return parser


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ct2x.data.films import prepare_film
    from ct2x.device import torch_device
    from ct2x.io import save_ct, save_png
    from ct2x.reconstruct import (
        check_views,
        describe_geometry,
        film_size,
        load_recon_model,
        network_input_picture,
        recon_model_file,
        reconstruct,
    )

    out, picture = _output_paths(args)
    if args.lateral is None and args.lateral_facing != "auto":
        raise CT2XInputError("--lateral-facing: is for the lateral film, and none is given (--lateral)")
    with option("--device"):
        device = str(torch_device(args.device))
    with option("--model"):
        model_file, info = recon_model_file(args.model)  # the header only: films are checked before the weights load
        views = check_views(info, args.lateral is not None)
        size = film_size(info)
    labels = {"pa": "PA", "lateral": "lateral"}
    _say(f"model: {model_file}: {info.kind}, {' and '.join(labels[v] for v in views)} film"
         f"{'s' * (len(views) > 1)} of {size} x {size} px")

    films = []
    for view, path in zip(views, (args.pa, args.lateral)):
        with option(f"--{view}"):
            film = prepare_film(path, view, size, invert=args.invert, crop=args.crop,
                                facing=args.lateral_facing if view == "lateral" else "auto")
        for choice in film.choices:
            _say(f"{labels[view]}: {choice}")
        films.append(film)
    with option("--model"):
        model = load_recon_model(model_file, device)
    with option("--model"), tqdm(total=100, desc=f"{PROG} ({args.precision})", unit="%", leave=False,
                                 bar_format="{desc}: {percentage:3.0f}% |{bar}| {elapsed}<{remaining}") as bar:
        volume = reconstruct(model, *films, device=device, precision=args.precision,
                             progress=lambda fraction: bar.update(100 * fraction - bar.n))
    _say(describe_geometry(model.info, volume.hu.shape[0]))

    staged_picture = save_png(network_input_picture(films), picture.with_name(f".{picture.stem}.partial.png"))
    try:
        save_ct(volume, out)  # atomic: the CT is either written whole or not at all
        os.replace(staged_picture, picture)
    except BaseException:
        staged_picture.unlink(missing_ok=True)
        raise
    print(f"{PROG}: CT in {out}; the films as the network read them in {picture}")
    return 0


def _output_paths(args: argparse.Namespace) -> Tuple[Path, Path]:
    """(CT path, picture path) from --out, checked: known ending, existing folder, no file replaced unasked, no input
    overwritten."""
    out = Path(args.out).expanduser()
    suffix = next((s for s in CT_SUFFIXES if out.name.lower().endswith(s)), None)
    if suffix is None or len(out.name) == len(suffix):
        raise CT2XInputError(f"--out {args.out}: name the CT file with one of the endings {', '.join(CT_SUFFIXES)}")
    if not out.parent.is_dir():
        raise CT2XInputError(f"--out {args.out}: folder {out.parent} does not exist; create it first")
    picture = out.with_name(out.name[:-len(suffix)] + PICTURE_SUFFIX)
    inputs: List[Path] = [Path(p).expanduser() for p in (args.pa, args.lateral, args.model) if p is not None]
    for path in (out, picture):
        if path.is_dir():
            raise CT2XInputError(f"--out {args.out}: {path} is a folder")
        if any(path.exists() and given.exists() and path.samefile(given) for given in inputs):
            raise CT2XInputError(f"--out {args.out}: would overwrite the input {path}; choose another name")
        if path.exists() and not args.overwrite:
            raise CT2XInputError(f"--out {args.out}: {path} exists; choose another name or pass --overwrite")
    return out, picture


def _say(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr)
