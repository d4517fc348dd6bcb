"""Render X-ray series of CTs through CT2XSynth's logic, without the GUI.

    Slicer --no-splash --no-main-window --python-script CT2XSynth/Scripts/batch_synth.py \\
        --input DIR_OR_FILE --output DIR [--angles=-90:90:30] [--secondary DEG] [--size PX] [--spacing MM] \\
        [--sdd MM] [--sid MM] [--spectrum 60kV|90kV|120kV] [--noise PHOTONS] [--device cpu|cuda:N] \\
        [--model CT2X_GAN_MODEL --style XRAY]

Every CT file in --input (NRRD, NIfTI, MHA/MHD; a folder is searched recursively) is loaded, rendered at each
horizontal angle and written as OUTPUT/<ct name>/<ct name>_<angle>deg/<ct name>_<angle>deg.nrrd: a float32
single-slice volume of the attenuation -ln(I / I0) with the detector pixel spacing, placed on the detector plane
(RAS mm), as the module makes it. With --model (a CT2X-GAN model file) and --style (a reference X-ray file), the
films are CT2X-GAN's in that X-ray's look instead, in the model's own geometry and on its 0 ... 1 scale (the physics
and geometry options are not used). Each film has a folder of its own (see `film_path`). A CT that fails is reported
on stderr and skipped; the others still run.
Exit status: 0 every CT succeeded, 1 at least one failed (or none was found), 2 bad arguments.
"""

import argparse
import re
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional, Sequence

import slicer

CT_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
# "-90:90:30" looks like an option to argparse; such values are joined to their option (--angles=-90:90:30).
_NEGATIVE_VALUE = re.compile(r"^-\.?\d")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="batch_synth.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="CT file, or folder searched recursively for CT files")
    parser.add_argument("--output", required=True, help="output folder (created)")
    parser.add_argument("--angles", default="-90:90:30",
                        help="horizontal angles, deg: START:STOP:STEP, a,b,c or one number (default %(default)s)")
    parser.add_argument("--secondary", type=float, default=0.0, help="vertical (cranial +) angle, deg (default 0)")
    parser.add_argument("--size", type=int, default=256, help="detector pixels per side (default 256)")
    parser.add_argument("--spacing", type=float, default=0.0,
                        help="detector pixel spacing, mm (default 0: fit the body in view)")
    parser.add_argument("--sdd", type=float, default=1020.0, help="source-to-detector distance, mm (default 1020)")
    parser.add_argument("--sid", type=float, default=530.0, help="source-to-isocentre distance, mm (default 530)")
    parser.add_argument("--spectrum", default="60kV", choices=("60kV", "90kV", "120kV"), help="tube spectrum")
    parser.add_argument("--noise", type=int, default=0, help="photons per pixel for quantum noise; 0 = noiseless")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda:N (default cpu)")
    parser.add_argument("--model", default="", help="CT2X-GAN model file: the learned engine instead of the physics")
    parser.add_argument("--style", default="", help="CT2X-GAN: the reference X-ray file (PNG, JPEG, DICOM)")
    joined = []
    for token in argv:
        if joined and joined[-1].startswith("--") and "=" not in joined[-1] and _NEGATIVE_VALUE.match(token):
            joined[-1] = f"{joined[-1]}={token}"
        else:
            joined.append(token)
    return parser.parse_args(joined)


def find_cts(source: Path) -> List[Path]:
    """CT files: `source` itself, or every file with a CT suffix under the folder `source`, sorted."""
    if source.is_file():
        return [source]
    return sorted(path for path in source.rglob("*") if path.is_file() and path.name.lower().endswith(CT_SUFFIXES))


def stem(path: Path) -> str:
    """File name without its CT suffix ("chest.nii.gz" -> "chest")."""
    name = path.name
    for suffix in CT_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def film_path(output: Path, ctName: str, primaryDeg: float) -> Path:
    """OUTPUT/<ct name>/<ct name>_<angle>deg/<ct name>_<angle>deg.nrrd: every film alone in its folder.

    Slicer loads a single-slice file together with the files beside it whose names differ from its own in one run
    of digits only (vtkITK's archetype series detection, itk::ArchetypeSeriesFileNames), as one multi-slice volume:
    films of one CT side by side, "+000.0deg" and "+090.0deg", would load as one two-slice volume.
    """
    filmName = f"{ctName}_{primaryDeg:+06.1f}deg"
    return output / ctName / filmName / f"{filmName}.nrrd"


def render_ct(logic, path: Path, output: Path, args: argparse.Namespace, angles: List[float], engine: dict) -> int:
    """Render one CT at every angle into output/<stem>/ with the `engine` settings of `CT2XSynthLogic.process` (none:
    the physics); returns the number of films written."""
    ctNode = slicer.util.loadVolume(str(path), {"show": False})
    filmNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{stem(path)} X-ray")
    try:
        for primaryDeg in angles:
            logic.process(ctNode, filmNode, primaryDeg, args.secondary, spectrum=args.spectrum,
                          noisePhotons=args.noise, sourceToDetectorMm=args.sdd, sourceToIsocenterMm=args.sid,
                          detectorSizePx=args.size, pixelSpacingMm=args.spacing, device=args.device,
                          showResult=False, **engine)
            filmPath = film_path(output, stem(path), primaryDeg)
            filmPath.parent.mkdir(parents=True, exist_ok=True)
            if not slicer.util.saveNode(filmNode, str(filmPath)):
                raise RuntimeError(f"could not write {filmPath}")
        return len(angles)
    finally:
        logic.clearCache()
        slicer.mrmlScene.RemoveNode(filmNode)
        slicer.mrmlScene.RemoveNode(ctNode)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from CT2XSynthLib import dependencies

    from CT2XSynth import GAN_ENGINE, CT2XSynthLogic

    dependencies.add_core_to_path()
    from ct2x.errors import CT2XInputError
    from ct2x.geometry import parse_angles

    try:
        angles = parse_angles(args.angles)
    except CT2XInputError as error:
        print(f"batch_synth: --angles: {error}", file=sys.stderr)
        return 2
    source, output = Path(args.input), Path(args.output)
    cts = find_cts(source) if source.exists() else []
    if not cts:
        print(f"batch_synth: no CT files ({', '.join(CT_SUFFIXES)}) found at {source}", file=sys.stderr)
        return 1
    dependencies.ensure_torch()
    logic = CT2XSynthLogic()
    engine = {"engine": GAN_ENGINE, "ganModel": args.model, "style": args.style or None} if args.model else {}
    failed = []
    for index, path in enumerate(cts, start=1):
        start = time.perf_counter()
        try:
            count = render_ct(logic, path, output, args, angles, engine)
        except Exception as error:
            failed.append(path)
            print(f"batch_synth: [{index}/{len(cts)}] FAILED {path}: {error}", file=sys.stderr)
            if not isinstance(error, CT2XInputError):
                traceback.print_exc()
            continue
        print(f"batch_synth: [{index}/{len(cts)}] {path}: {count} X-rays in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
    print(f"batch_synth: {len(cts) - len(failed)} of {len(cts)} CTs rendered into {output}"
          + (f"; failed: {', '.join(str(p) for p in failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


slicer.util.exit(main())  # run by Slicer --python-script: exit the application with the status
