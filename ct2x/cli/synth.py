"""`ct2x synth CT --model MODEL --style XRAY --angles -90:90:30 --out DIR`: X-ray films of a CT with a CT2X-GAN model.

Writes, per view i at primary angle a, `view_{i:03d}_{a:+06.1f}deg.png` (8-bit, the film's [0, 1] as 0 ... 255) and
`..._film.mha` (float32 in [0, 1], detector pixel spacing in mm); `overview.png` (all views, labelled);
`style_code.safetensors` (the style used, for `--style` next time; models with a style encoder); and `series.json`
(inputs, model, preparation, style, every view's files and geometry with its 25-number pose label, timings).

The output folder behaves as `ct2x drr`'s (`ct2x.output_folder.OutputFolder`): DIR is either as it was or the new
series whole; `--overwrite` replaces only an earlier ct2x output. Every input (angles, device, model header, style,
CT) is checked before the weights load and before anything is written.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

from ct2x import __version__
from ct2x.cli.drr import DEFAULT_ANGLES, _contact_sheet, _read_volume
from ct2x.cli.options import option
from ct2x.errors import CT2XInputError, CT2XWarning
from ct2x.output_folder import OutputFolder
from ct2x.precision import PRECISIONS

PROG = "ct2x synth"
STYLE_CODE_FILE = "style_code.safetensors"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "synth", help="synthesise X-ray films of a CT in a real film's style with a CT2X-GAN model",
        description="Synthesise C-arm X-ray films of a CT (NIfTI, NRRD, MHA/MHD file or DICOM folder) with a CT2X-GAN "
                    "model file, in the style of a reference X-ray film. The CT is put on the model's cube as its "
                    "training data was and encoded once; each angle then costs one run of the pose part. Angles in "
                    "degrees.")
    parser.add_argument("ct", metavar="CT", help="CT file or DICOM folder")
    parser.add_argument("--model", required=True, metavar="MODEL",
                        help="CT2X-GAN model file (.safetensors, kind ct2x-gan) or a name from `ct2x models list`")
    parser.add_argument("--style", metavar="XRAY",
                        help="reference X-ray film (PNG, JPEG or DICOM; prepared as `ct2x reconstruct` prepares "
                             f"films) or a saved style code (.safetensors, e.g. an earlier run's {STYLE_CODE_FILE}); "
                             "required unless the model has no style encoder")
    parser.add_argument("--style-view", choices=("pa", "lateral"), default="pa",
                        help="what the reference film shows (default %(default)s)")
    parser.add_argument("--invert", choices=("auto", "yes", "no"), default="auto",
                        help="whether the reference film shows bone dark and must be turned over (default "
                             "%(default)s: DICOM's MONOCHROME1, else detected from the anatomy)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder (created; must be new, empty or, with --overwrite, an earlier ct2x output)")
    parser.add_argument("--angles", default=DEFAULT_ANGLES, metavar="ANGLES",
                        help="primary C-arm angles, deg: START:STOP:STEP, a,b,c or one number (0 = AP, +90 = left "
                             "lateral; default %(default)s, the paper's seven poses)")
    parser.add_argument("--secondary", type=float, default=0.0, metavar="DEG",
                        help="secondary (cranial +, caudal -) angle, deg (default %(default)s, as in training)")
    parser.add_argument("--series", metavar="UID", help="SeriesInstanceUID when the DICOM folder holds several")
    parser.add_argument("--stored-values", choices=("auto", "hu", "hu+1024"), default="auto",
                        help="what the CT file stores (default %(default)s: HU + 1024 recognised, with a notice)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N (default %(default)s)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32, or bf16: the generator in bfloat16, several times faster on CPUs with AVX-512 "
                             "BF16 or AMX and on GPUs, about 1 %% from fp32 (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier ct2x output in DIR (only once the new series is complete)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from ct2x.device import torch_device
    from ct2x.geometry import check_secondary_angle, parse_angles
    from ct2x.io import save_image, save_png
    from ct2x.synthesize import (
        Synthesizer,
        load_synth_model,
        network_config,
        save_style_code,
        synth_model_file,
    )

    keep = [Path.cwd(), Path(args.ct), Path(args.model)] + ([Path(args.style)] if args.style else [])
    output = OutputFolder(args.out, overwrite=args.overwrite, name=f"--out {args.out}", keep=keep)
    output.check()  # claimed for real only once every input is read
    with option("--angles"):
        angles = parse_angles(args.angles)  # primary angles, deg
    with option("--secondary"):
        check_secondary_angle(args.secondary)
    with option("--device"):
        device = str(torch_device(args.device))
    with option("--model"):
        model_file, info, preparation = synth_model_file(args.model)  # the header only: inputs first, weights last
        config = network_config(info)
    _say(f"model: {model_file}: {info.kind}, {config.image_size}^2 px films from a {preparation.cube_mm:g} mm cube of "
         f"{preparation.ct_voxels}^3 voxels" + ("" if config.style_encoder else ", no style encoder"))
    _note_untrained_poses(angles, args.secondary, preparation.angles_deg)

    with option("--style"):
        style = _read_style(args, config.style_encoder, preparation.film_px)
    volume = _read_volume(args)
    with option("--model"):
        model = load_synth_model(model_file, device)
    with option("--model"), tqdm(total=100, desc=f"{PROG}: encoding the CT", unit="%", leave=False,
                                 disable=args.quiet, bar_format="{desc}: {percentage:3.0f}% |{bar}| {elapsed}") as bar:
        start = time.perf_counter()
        synthesizer = Synthesizer(model, volume, style, style_view=args.style_view, device=device,
                                  precision=args.precision,
                                  progress=lambda fraction: bar.update(100 * fraction - bar.n))
        encode_seconds = time.perf_counter() - start

    with output as partial:  # published when the block ends; any exception leaves DIR as it was
        stems = [f"view_{i:03d}_{angle:+06.1f}deg" for i, angle in enumerate(angles)]
        displays, records, seconds = [], [], []
        for stem, angle in tqdm(list(zip(stems, angles)), desc=f"{PROG}: synthesising", unit="view",
                                disable=args.quiet, file=sys.stderr):
            tic = time.perf_counter()
            film = synthesizer.render(angle, args.secondary)  # (F, F) float32 in [0, 1], radiological display
            seconds.append(time.perf_counter() - tic)
            view = synthesizer.view(angle, args.secondary)
            files = {"display_png": f"{stem}.png", "film_mha": f"{stem}_film.mha"}
            displays.append(np.round(film * 255.0).astype(np.uint8))
            save_png(displays[-1], partial / files["display_png"])
            save_image(film, partial / files["film_mha"], view.detector.pixel_spacing_mm)
            records.append({"index": len(records), "files": files, "render_seconds": round(seconds[-1], 4),
                            "geometry": view.to_dict()})
        save_png(_contact_sheet(displays, angles), partial / "overview.png")
        style_code = synthesizer.style_code()
        if style_code is not None:
            style_code = style_code._replace(source=style_code.source or str(Path(args.style).expanduser().resolve()))
            save_style_code(partial / STYLE_CODE_FILE, style_code)
        series = {
            "created_by": f"ct2x {__version__} synth",
            "input": {"path": str(Path(args.ct).expanduser().resolve()), "description": volume.source,
                      "dicom_series_uid": args.series, "stored_offset_hu": volume.stored_offset_hu},
            "model": {"path": str(model_file), "kind": info.kind, "description": info.description,
                      "license": info.license, "config": info.config},
            "preparation": {"cube_mm": preparation.cube_mm, "ct_voxels": preparation.ct_voxels,
                            "film_px": preparation.film_px, "mip_px": preparation.mip_px,
                            "trained_angles_deg": list(preparation.angles_deg),
                            "cube_center_ras_mm": synthesizer.isocenter_ras.tolist()},
            "style": None if style_code is None else {"source": style_code.source, "view": args.style_view,
                                                      "file": STYLE_CODE_FILE},
            "films": "[0, 1]: attenuation over its maximum as the model learned it (air 0, bone bright), "
                     "radiological display; PNG = round(255 x film)",
            "precision": args.precision, "device": device,
            "timing_seconds": {"encode": round(encode_seconds, 4), "median_view": round(statistics.median(seconds), 4)},
            "views": records,
        }
        (partial / "series.json").write_text(json.dumps(series, indent=2) + "\n")

    print(f"{PROG}: {len(angles)} film{'s' * (len(angles) != 1)} in {output.path} (see overview.png and "
          f"series.json)\n  CT encoding {encode_seconds:.2f} s once, then {statistics.median(seconds):.3f} s per view "
          f"(median) on {device}, {args.precision}")
    return 0


def _read_style(args: argparse.Namespace, needed: bool, size: int):
    """The style as the engine takes it: a style code, a prepared film (its decisions printed), or None."""
    from ct2x.data.films import prepare_film
    from ct2x.synthesize import load_style_code

    if not needed:
        if args.style is not None:
            raise CT2XInputError("the model has no style encoder (the w/o E_sty ablation): it takes no style; leave "
                                 "--style out")
        return None
    if args.style is None:
        raise CT2XInputError("the model needs a style: give a reference X-ray film or a saved style code")
    if Path(args.style).suffix == ".safetensors":
        code = load_style_code(args.style)
        _say(f"style: the style code in {args.style}" + (f" (made from {code.source})" if code.source else ""))
        return code
    film = prepare_film(args.style, args.style_view, size, invert=args.invert)
    for choice in film.choices:
        _say(f"style film: {choice}")
    return film


def _note_untrained_poses(angles: list, secondary: float, trained: tuple) -> None:
    """A notice when the poses leave those the model learned (its preparation's primary angles, secondary 0)."""
    outside = [angle for angle in angles if not min(trained) <= angle <= max(trained)]
    parts = ([f"primary {', '.join(f'{angle:g}' for angle in outside)} deg"] if outside else []) + \
        ([f"secondary {secondary:g} deg"] if secondary else [])
    if parts:
        warnings.warn(f"the model learned primary angles {min(trained):g} ... {max(trained):g} deg with secondary 0; "
                      f"{' and '.join(parts)} lie outside: those films are extrapolations", CT2XWarning, stacklevel=2)


def _say(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr)
