"""Every bad option of `ct2x drr` and every bad argument of the Python API gets a message, never a traceback.

The command-line cases name a CT that does not exist: the message must be about the option, which shows that options
are checked before the CT is read.
"""

from __future__ import annotations

import numpy as np
import pytest

from ct2x import phantoms
from ct2x.cli.main import main
from ct2x.drr import DRRRenderer, Physics, check_window, to_display
from ct2x.errors import CT2XInputError
from ct2x.geometry import CArm, Detector, parse_angles
from ct2x.memory import drr_peak_bytes

BAD_OPTIONS = [  # (options, the option the message must name, a phrase of its reason)
    (["--size", "100000"], "--size", "from 1 to 16384"),
    (["--size", "16000"], "--size", "GiB of memory"),
    (["--size", "0"], "--size", "positive"),
    (["--angles", "0:inf:1"], "--angles", "finite"),
    (["--angles", "nan"], "--angles", "finite"),
    (["--angles", "0:1e9:1"], "--angles", "at most 3600"),
    (["--angles", "0:1e308:1e-308"], "--angles", "at most 3600"),
    (["--angles", "10:0:5"], "--angles", "STOP >= START"),
    (["--angles", "a,b"], "--angles", "START:STOP:STEP"),
    (["--secondary", "90"], "--secondary", "between -90 and 90"),
    (["--sdd", "1e308", "--sid", "1"], "--sdd", "at most 5000 mm"),
    (["--sdd", "inf"], "--sdd", "positive finite"),
    (["--sid", "2000"], "--sid", "shorter than source-to-detector"),
    (["--spacing", "1e-9"], "--spacing", "between 0.001 and 100 mm"),
    (["--seed", str(2**64)], "--seed", "2^64"),
    (["--seed", "-1"], "--seed", "2^64"),
    (["--noise", "0.5"], "--noise", "fewer leave a blank film"),
    (["--noise", "1e19"], "--noise", "more add no visible noise"),
    (["--window", "0", "inf"], "--window", "finite"),
    (["--window", "3", "1"], "--window", "low below high"),
    (["--window", "nan", "1"], "--window", "finite"),
    (["--energy", "0"], "--energy", "positive"),
    (["--energy", "500"], "--energy", "outside the tables"),
    (["--spectrum", "200kV"], "--spectrum", "unknown"),
    (["--device", "tpu"], "--device", "not a device"),
    (["--device", "cuda:99"], "--device", "cuda"),
    (["--stored-values", "hu+1000"], "--stored-values", "invalid choice"),
]


@pytest.mark.parametrize("options, option, reason", BAD_OPTIONS, ids=[" ".join(case[0]) for case in BAD_OPTIONS])
def test_bad_option_is_refused_before_the_ct_is_read(options, option, reason, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["drr", str(tmp_path / "missing.nii.gz"), "--out", str(out), *options]) == 2
    error = capsys.readouterr().err
    assert option in error and reason in error, error
    assert "Traceback" not in error and "missing.nii.gz" not in error
    assert not out.exists()


@pytest.fixture(scope="module")
def chest():
    return phantoms.chest(size=32, spacing_mm=10.0)


@pytest.mark.parametrize("call, reason", [
    (lambda: Detector.square(0), "at least 1"),
    (lambda: Detector.square(2.5), "whole number"),
    (lambda: Detector(64, 64, (float("nan"), 1.0)), "between"),
    (lambda: CArm(float("inf"), 530), "at most 5000 mm"),
    (lambda: Physics(energy_kev=0), "outside the tables"),
    (lambda: Physics(energy_kev=float("nan")), "photon energy in keV"),
    (lambda: Physics(spectrum="70kV"), "unknown"),
    (lambda: Physics(noise_photons=0), "blank film"),
    (lambda: Physics(seed=2**64), "from 0 to 2"),
    (lambda: parse_angles("1:2:3:4"), "START:STOP:STEP"),
    (lambda: check_window((2.0, 1.0)), "low below high"),
    (lambda: check_window((float("nan"), 1.0)), "finite"),
    (lambda: check_window("dark"), "two numbers"),
    (lambda: to_display(np.zeros((2, 2)), (0.0, float("inf"))), "finite"),
], ids=["detector 0 px", "detector 2.5 px", "nan spacing", "infinite sdd", "energy 0", "energy nan",
        "unknown spectrum", "zero photons", "seed too large", "angles 4 parts", "inverted window", "nan window",
        "word window", "infinite window"])
def test_python_api_refuses_bad_arguments_with_input_errors(call, reason):
    with pytest.raises(CT2XInputError, match=reason):
        call()


def test_renderer_refuses_an_unusable_device_and_window(chest):
    with pytest.raises(CT2XInputError, match="device 'cuda:7'"):
        DRRRenderer(chest, device="cuda:7")
    with pytest.raises(CT2XInputError, match="low below high"):
        DRRRenderer(chest, window=(3.0, 1.0))


def test_energy_zero_is_never_read_as_the_spectrum(chest):
    """`Physics(energy_kev=0)` once rendered the 60 kV spectrum silently."""
    with pytest.raises(CT2XInputError):
        DRRRenderer(chest, physics=Physics(energy_kev=0.0))


def test_one_material_name_is_one_material(chest):
    film = DRRRenderer(chest, CArm(1020, 700, Detector.square(16, 25.0))).render(0)
    np.testing.assert_array_equal(film.material_attenuation("bone"), film.material_attenuation(["bone"]))
    with pytest.raises(CT2XInputError, match="unknown materials \\['iron'\\]"):
        film.material_attenuation("iron")


def test_memory_estimate_grows_with_the_volume_and_the_detector():
    small = drr_peak_bytes(10**6, 256**2)
    assert drr_peak_bytes(10**8, 256**2) > 50 * (small - drr_peak_bytes(0, 256**2))
    assert drr_peak_bytes(10**6, 2048**2) > small + 1e9
