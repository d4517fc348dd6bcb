"""Peer DRR engines (DiffDRR, nanodrr, plastimatch) driven on exactly the geometry of a `ct2x.geometry.View`.

Every renderer takes the same input, a volume of linear attenuation coefficients `mu` (K, J, I) float32 in 1/mm with
its voxel (i, j, k) -> RAS mm affine, and returns the line integral of mu along each ray (unitless) as an (H, W)
float64 image laid out like ours: row 0 at the top of the detector (`view.row_direction` points down the rows),
columns along `view.column_direction` (the peers render in camera layout, so a mirrored, radiologically displayed
PA-like view gets its columns flipped). The mapping from each peer's conventions to ours:

- DiffDRR 0.6.1 (`diffdrr.drr.DRR`, Siddon renderer by default): camera at the source looking along +z, detector
  pixel (r, c) at x = -(c + 0.5 - W/2) * delx, y = -(r + 0.5 - H/2) * dely with `reverse_x_axis=True`, i.e. our camera
  turned 180 deg about z. It gets the pose `camera_to_world @ diag(-1, -1, 1, 1)`, no reorientation matrix, our RAS
  affine as the world (no re-centring) and mu as its density (its own HU -> [0, 1] transform is bypassed).
- nanodrr 0.1.7 (`nanodrr.drr.DRR`, torch `grid_sample` backend): its camera is ours (pixel (u, v) = (c + 0.5,
  r + 0.5) through K^-1, +z towards the detector), so `rt_inv` is our `camera_to_world`; `convert_to_mu=False` feeds
  mu directly.
- plastimatch `drr` (Debian package): LPS world; a volume with identity direction (checked); `-n` the unit vector
  isocentre -> source, `--vup` the vector towards the top row, `-o` the isocentre, all in LPS mm; `-P none` so it
  integrates our mu instead of its own 0.022 (1 + HU/1000) with HU <= -800 -> 0; its output is divided by 10
  ("mm -> cm"), so we multiply by 10. Its image then lines up with ours. `-n` is used instead of `-y` (gantry
  angle) because plastimatch 1.9.4 takes the gantry angle in radians.
"""

from __future__ import annotations

import importlib.util
import os
import re
import resource
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Type

import numpy as np
import SimpleITK as sitk
import torch

from ct2x.conventions import LPS_TO_RAS, sitk_geometry_from_affine
from ct2x.geometry import View

MU_WATER_PER_MM = 0.02  # linear attenuation of water, 1/mm; air is 0


def hu_to_mu(hu: np.ndarray) -> np.ndarray:
    """The benchmark's attenuation model: mu = 0.02 /mm * max(0, 1 + HU/1000), float32 1/mm, same shape."""
    return (MU_WATER_PER_MM * np.maximum(0.0, 1.0 + np.asarray(hu, dtype=np.float32) / 1000.0)).astype(np.float32)


def peak_rss_mb(pid: Optional[int] = None) -> Optional[float]:
    """High-water mark of resident memory (MB) of a live process (this one by default); None once it has exited.

    Linux's VmHWM, not getrusage's ru_maxrss: the latter carries the parent's peak over fork + exec, so a worker
    started by a driver holding a CT would report the driver's memory.
    """
    status = Path(f"/proc/{pid or 'self'}/status")
    if not status.exists():  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS) is the best there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 if pid is None else None
    found = re.search(r"VmHWM:\s*(\d+) kB", status.read_text())
    return int(found.group(1)) / 1024.0 if found else None


def cpu_snapshot() -> Optional[Tuple[float, float, float]]:
    """(busy, total) CPU seconds of the whole machine since boot (Linux /proc/stat; steal counts as busy) and the
    CPU seconds used by this process and its finished children; None where /proc/stat is missing."""
    stat = Path("/proc/stat")
    if not stat.exists():
        return None
    # user, nice, system, idle, iowait, irq, softirq, steal
    ticks = [int(n) for n in stat.read_text().split("\n", 1)[0].split()[1:9]]
    per_second = float(os.sysconf("SC_CLK_TCK"))
    own = os.times()
    total = sum(ticks) / per_second
    own_seconds = own.user + own.system + own.children_user + own.children_system
    return total - (ticks[3] + ticks[4]) / per_second, total, own_seconds


def foreign_cpu_percent(before: Tuple[float, float, float], after: Tuple[float, float, float]) -> float:
    """Share of the machine's CPU (%) between two snapshots used by anything but us: other processes, or the
    hypervisor (steal). Timings taken while it is high are unreliable."""
    busy, total, own = (a - b for a, b in zip(after, before))
    return 100.0 * max(0.0, busy - own) / total if total > 0 else 0.0


class Renderer:
    """One engine set up for one volume and one view. Construction is the engine's per-CT / per-view setup."""

    name = ""

    def __init__(self, mu: np.ndarray, affine: np.ndarray, view: View, work_dir: Path):
        self.view = view

    def render(self) -> np.ndarray:
        """The (H, W) float64 line-integral image, aligned with ours."""
        raise NotImplementedError

    def displayed(self, image: np.ndarray) -> np.ndarray:
        """An image in camera layout (columns along camera x) -> our display layout, mirrored for PA-like views."""
        return np.ascontiguousarray(image[:, ::-1] if self.view.mirrored else image)

    def peak_rss_mb(self) -> float:
        """Peak resident memory (MB) of the process that did the work: this one."""
        return peak_rss_mb()

    def timed_render(self) -> Tuple[float, np.ndarray]:
        """One render -> (seconds it took, image)."""
        start = time.perf_counter()
        image = self.render()
        return time.perf_counter() - start, image

    def timed_renders(self, warmup: int, repeats: int, max_seconds: float,
                      min_seconds: float = 0.0) -> Tuple[List[float], np.ndarray]:
        """Seconds per render for the renders after `warmup` untimed ones, and the last image: at least `repeats`
        renders, and more until `min_seconds` of wall time have passed since the first timed one.

        Stops early once the timed renders add up to `max_seconds`, keeping at least 3.
        """
        image = None
        for _ in range(warmup):
            image = self.render()
        seconds: List[float] = []
        start = time.perf_counter()
        while ((len(seconds) < repeats or time.perf_counter() - start < min_seconds)
               and (len(seconds) < 3 or sum(seconds) < max_seconds)):
            elapsed, image = self.timed_render()
            seconds.append(elapsed)
        return seconds, image


class DiffDRRRenderer(Renderer):
    """DiffDRR's `DRR` module (Siddon by default) on our geometry."""

    name = "diffdrr"
    renderer = "siddon"

    def __init__(self, mu: np.ndarray, affine: np.ndarray, view: View, work_dir: Path):
        super().__init__(mu, affine, view, work_dir)
        from diffdrr.drr import DRR
        from diffdrr.pose import RigidTransform
        from torchio import ScalarImage, Subject

        mu_ijk = torch.from_numpy(np.ascontiguousarray(mu.transpose(2, 1, 0)))[None]  # (1, I, J, K) 1/mm
        image = ScalarImage(tensor=mu_ijk, affine=affine)
        subject = Subject(volume=image, density=image, mask=None, reorient=torch.eye(4), orientation=None,
                          fiducials=None)
        du, dv = view.detector.pixel_spacing_mm
        self.drr = DRR(subject, sdd=view.source_to_detector_mm, height=view.detector.height_px, delx=du,
                       width=view.detector.width_px, dely=dv, reverse_x_axis=True, renderer=self.renderer)
        pose = view.camera_to_world @ np.diag([-1.0, -1.0, 1.0, 1.0])  # DiffDRR camera = ours turned 180 deg about z
        self.pose = RigidTransform(torch.tensor(pose, dtype=torch.float32)[None])
        self.render_kwargs = {"n_points": max(mu.shape)} if self.renderer == "trilinear" else {}

    def render(self) -> np.ndarray:
        with torch.no_grad():
            return self.displayed(self.drr(self.pose, **self.render_kwargs)[0, 0].double().numpy())


class DiffDRRTrilinearRenderer(DiffDRRRenderer):
    """DiffDRR with its trilinear renderer, one sample per voxel of the longest volume axis."""

    name = "diffdrr-trilinear"
    renderer = "trilinear"


class NanoDRRRenderer(Renderer):
    """nanodrr's `DRR` module, torch backend (the fused kernels need CUDA or MPS)."""

    name = "nanodrr"

    def __init__(self, mu: np.ndarray, affine: np.ndarray, view: View, work_dir: Path):
        super().__init__(mu, affine, view, work_dir)
        from nanodrr.data import Subject
        from nanodrr.drr import DRR
        from torchio import ScalarImage

        mu_ijk = torch.from_numpy(np.ascontiguousarray(mu.transpose(2, 1, 0)))[None]  # (1, I, J, K) 1/mm
        self.subject = Subject.from_images(ScalarImage(tensor=mu_ijk, affine=affine), convert_to_mu=False)
        du, dv = view.detector.pixel_spacing_mm
        self.drr = DRR.from_carm_intrinsics(view.source_to_detector_mm, du, dv, 0.0, 0.0, view.detector.height_px,
                                            view.detector.width_px, dtype=torch.float32)
        self.rt_inv = torch.tensor(view.camera_to_world, dtype=torch.float32)[None]  # (1, 4, 4) camera -> RAS mm
        self.n_samples = max(mu.shape)  # samples per ray, spread over the part inside the volume's box

    def render(self) -> np.ndarray:
        with torch.no_grad():
            image = self.drr(self.subject, self.rt_inv, n_samples=self.n_samples, backend="torch")
        return self.displayed(image[0, 0].double().numpy())


class PlastimatchRenderer(Renderer):
    """plastimatch's `drr` command (exact Siddon ray tracing, OpenMP); one process per image.

    Its time per image is plastimatch's own "Total time" minus its "I/O time" (writing the image), so process
    start-up and reading the volume are excluded; the wall time of each whole process is kept apart
    (`process_seconds`). Peak memory is the largest VmHWM of the plastimatch processes, polled while they run.
    """

    name = "plastimatch"
    poll_seconds = 0.02

    def __init__(self, mu: np.ndarray, affine: np.ndarray, view: View, work_dir: Path):
        super().__init__(mu, affine, view, work_dir)
        direction_lps = (LPS_TO_RAS @ affine)[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
        if not np.allclose(direction_lps, np.eye(3), atol=1e-6):
            raise ValueError("plastimatch needs a volume with identity direction (LPS axes); resample it first")
        if view.beam != "cone":
            raise ValueError("plastimatch drr renders cone-beam views only")
        self.input_mha = work_dir / "mu.mha"
        if not self.input_mha.exists():
            _write_mha(mu, affine, self.input_mha)
        self.output_prefix = work_dir / f"plastimatch_{os.getpid()}_"
        source_lps = view.source_ras * [-1.0, -1.0, 1.0]  # (3,) LPS mm
        isocenter_lps = np.asarray(view.isocenter_ras) * [-1.0, -1.0, 1.0]
        to_source = source_lps - isocenter_lps
        up_lps = -view.row_direction * [-1.0, -1.0, 1.0]  # detector centre -> top row
        du, dv = view.detector.pixel_spacing_mm
        height, width = view.detector.shape

        def text(values) -> str:
            return " ".join(f"{v:.9g}" for v in values)

        self.command = ["plastimatch", "drr", "-A", "cpu", "-i", "exact", "-P", "none", "-t", "pfm",
                        "-r", f"{height} {width}", "-z", text([height * dv, width * du]),
                        "--sad", f"{np.linalg.norm(to_source):.9g}", "--sid", f"{view.source_to_detector_mm:.9g}",
                        "-o", text(isocenter_lps), "-n", text(to_source / np.linalg.norm(to_source)),
                        "--vup", text(up_lps), "-O", str(self.output_prefix), str(self.input_mha)]
        self.env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
        self.peak_mb = 0.0
        self.process_seconds: List[float] = []  # wall time of each plastimatch process: start-up, reading, writing

    def timed_render(self) -> Tuple[float, np.ndarray]:
        """One plastimatch process -> (seconds it spent rendering, by its own clock, image)."""
        start = time.perf_counter()
        process = subprocess.Popen(self.command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        while process.poll() is None:
            self.peak_mb = max(self.peak_mb, peak_rss_mb(process.pid) or 0.0)
            time.sleep(self.poll_seconds)
        log, errors = process.communicate()
        self.process_seconds.append(time.perf_counter() - start)  # to within a poll interval
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(self.command)} failed ({process.returncode}): {errors.strip()[-500:]}")
        total = float(re.search(r"Total time:\s*([0-9.eE+-]+)", log).group(1))
        writing = float(re.search(r"I/O time:\s*([0-9.eE+-]+)", log).group(1))
        output = Path(f"{self.output_prefix}0000.pfm")
        image = _read_pfm(output) * 10.0  # plastimatch divides line integrals by 10 (mm -> cm)
        output.unlink()
        Path(f"{self.output_prefix}0000.txt").unlink()
        return total - writing, self.displayed(image)

    def render(self) -> np.ndarray:
        return self.timed_render()[1]

    def peak_rss_mb(self) -> float:
        return self.peak_mb


def _write_mha(mu: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(mu)  # (K, J, I) -> ITK image, float32 1/mm
    origin, spacing, direction = sitk_geometry_from_affine(affine)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    partial = path.with_suffix(".partial.mha")
    sitk.WriteImage(image, str(partial))
    partial.replace(path)


def _read_pfm(path: Path) -> np.ndarray:
    """A single-channel PFM as plastimatch writes it (rows top to bottom) -> (H, W) float64."""
    with open(path, "rb") as stream:
        if stream.readline().strip() != b"Pf":
            raise ValueError(f"{path}: not a single-channel PFM file")
        width, height = (int(n) for n in stream.readline().split())
        scale = float(stream.readline())
        data = np.fromfile(stream, dtype="<f4" if scale < 0 else ">f4", count=width * height)
    return data.reshape(height, width).astype(np.float64)


PEERS: Dict[str, Type[Renderer]] = {
    renderer.name: renderer
    for renderer in (DiffDRRRenderer, DiffDRRTrilinearRenderer, NanoDRRRenderer, PlastimatchRenderer)
}
DEFAULT_PEERS = ("diffdrr", "nanodrr", "plastimatch")


def missing(name: str) -> Optional[str]:
    """Why peer `name` cannot run here ("not installed"), or None when it is available."""
    if name == "plastimatch":
        return None if shutil.which("plastimatch") else "not installed"
    package = name.split("-")[0]
    return None if importlib.util.find_spec(package) else "not installed"
