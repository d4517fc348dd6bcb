"""Films in -> HU volume out: time and peak memory of the biplanar generators, X2CT-GAN's (issue 9 §8) and
CVAA-GAN's (issue 13 §4).

Every configuration runs in its own worker process (so its peak resident size, Linux VmHWM, is its own): the generator
is built (`--kind`: its default, paper-size configuration with random initialisation, seed 0; or the weights of
`--model FILE`), set up as the configuration says, and `ct2x.reconstruct.reconstruct` - two prepared (S, S) films in
[0, 1] -> the CT in HU (network, clamp to [0, 1], `x2ct_denormalize`, CTVolume) - is timed: its first call apart
(oneDNN builds its kernels then; torch.compile compiles), then the median of `--repeats` calls, each with the share of
the machine's CPU that other processes took meanwhile. Loading a model file is timed apart. Agreement: relative L2 of
the raw network output against the fp32 configuration of the same ct2x and kind (and against the first --ct2x copy's
output of the same kind and configuration).

    python bench/bench_reconstruct.py --data-dir ../shared/data             # CPU, all configurations: 6-7 min
    python bench/bench_reconstruct.py --profile                             # + where the time and the memory go
    python bench/bench_reconstruct.py --device cuda --profile               # GPU: fp32, TF32, channels_last, fp16/bf16
    python bench/bench_reconstruct.py --ct2x . --ct2x DIR --configs fp32    # this checkout vs a patched copy (DIR
                                                                            # holds ct2x/), in turn, in one run
    python bench/bench_reconstruct.py --model FILE                          # the weights of a biplanar model file
    python bench/bench_reconstruct.py --kind x2ct-biplanar --kind cvaa-biplanar --configs fp32,ct2x-bf16
                                                                            # both networks, in turn, in one run

The films are the PA and lateral films of the real chest CT in `--data-dir` (as `ct2x prepare recon` makes them), or
of the built-in chest phantom when it is missing; they, the outputs and results.json go to bench/_work/reconstruct/.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

BENCH = Path(__file__).resolve().parent
WORK = BENCH / "_work" / "reconstruct"
CHEST_CT = "ct/chest_popi_phase00.nii.gz"
WEIGHT_SEED = 0
# --kind: biplanar films -> CT networks, built in their default (paper-size) configuration: module, class
KINDS = {"x2ct-biplanar": ("ct2x.nets.x2ct", "X2CTConfig"), "cvaa-biplanar": ("ct2x.nets.cvaa", "CVAAConfig")}
FOREIGN_WARN_PERCENT = 10.0

# name -> how the network runs. precision: fp32 | tf32 | ct2x-bf16 (`reconstruct(precision="bf16")`, the user's bf16
# path) | autocast-bf16 | autocast-fp16 (the whole network under torch.autocast; since the bf16 path landed, the
# network itself keeps its 2-D encoders and Connection-A in float32 under autocast) | autocast-bf16-3d (the same,
# wrapped by this script as before that) | bf16 | fp16 (the weights and films cast); cl: the 3-D convolution weights
# in channels_last_3d (the activations follow); threads: None = --threads; compile: torch.compile (inductor), fp32.
CPU_CONFIGS: Dict[str, Dict[str, Any]] = {
    "fp32": {"precision": "fp32", "what": "fp32 eager, torch.inference_mode"},
    "fp32-1thread": {"precision": "fp32", "threads": 1, "what": "the same on 1 thread"},
    "fp32-cl": {"precision": "fp32", "cl": True, "what": "fp32, channels_last_3d"},
    "ct2x-bf16": {"precision": "ct2x-bf16", "what": "ct2x.reconstruct(precision='bf16')"},
    "autocast-bf16": {"precision": "autocast-bf16", "what": "torch.autocast bf16, whole network"},
    "autocast-bf16-3d": {"precision": "autocast-bf16-3d", "what": "autocast bf16, 2-D encoders + Linear fp32"},
    "autocast-bf16-3d-cl": {"precision": "autocast-bf16-3d", "cl": True, "what": "the same, channels_last_3d"},
    "bf16": {"precision": "bf16", "what": "bf16 weights and films"},
    "bf16-cl": {"precision": "bf16", "cl": True, "what": "bf16 weights, channels_last_3d"},
    "compile": {"precision": "fp32", "compile": True, "what": "torch.compile (inductor), fp32"},
}
CUDA_CONFIGS: Dict[str, Dict[str, Any]] = {
    "fp32": {"precision": "fp32", "what": "fp32 eager (TF32 off), torch.inference_mode"},
    "tf32": {"precision": "tf32", "what": "TF32 convolutions and matmuls"},
    "ct2x-bf16": {"precision": "ct2x-bf16", "what": "ct2x.reconstruct(precision='bf16')"},
    "fp32-cl": {"precision": "fp32", "cl": True, "what": "fp32, channels_last_3d"},
    "autocast-fp16": {"precision": "autocast-fp16", "what": "torch.autocast fp16, whole network"},
    "autocast-fp16-cl": {"precision": "autocast-fp16", "cl": True, "what": "the same, channels_last_3d"},
    "autocast-bf16": {"precision": "autocast-bf16", "what": "torch.autocast bf16, whole network"},
    "autocast-bf16-3d": {"precision": "autocast-bf16-3d", "what": "autocast bf16, 2-D encoders + Linear fp32"},
    "fp16": {"precision": "fp16", "what": "fp16 weights and films"},
    "bf16": {"precision": "bf16", "what": "bf16 weights and films"},
    "compile": {"precision": "fp32", "compile": True, "what": "torch.compile (inductor), fp32"},
}
LOAD = "load"
PROFILE = "profile"
BF16_PATH = {"cpu": "ct2x-bf16", "cuda": "ct2x-bf16"}  # profiled beside fp32


# ----------------------------------------------------------------------------------------------- machine and load
def cpu_snapshot() -> Optional[Tuple[float, float, float]]:
    """(busy, total) CPU seconds of the machine since boot (/proc/stat, steal counts as busy) and this process's."""
    stat = Path("/proc/stat")
    if not stat.exists():
        return None
    ticks = [int(n) for n in stat.read_text().split("\n", 1)[0].split()[1:9]]  # user nice system idle iowait ...
    per_second = float(os.sysconf("SC_CLK_TCK"))
    own = os.times()
    total = sum(ticks) / per_second
    return total - (ticks[3] + ticks[4]) / per_second, total, own.user + own.system


def foreign_cpu_percent(before: Optional[tuple], after: Optional[tuple]) -> Optional[float]:
    """Share of the whole machine's CPU (%) used by anything but this process between two snapshots."""
    if before is None or after is None:
        return None
    busy, total, own = (a - b for a, b in zip(after, before))
    return 100.0 * max(0.0, busy - own) / total if total > 0 else 0.0


def load_bench_ct(path: Path):
    """A CT file (`ct2x.io.load_ct`), or the .npz that `bench/chest_npz.py` writes for a machine without SimpleITK."""
    if path.suffix == ".npz":
        from ct2x.volume import CTVolume

        with np.load(path) as arrays:
            return CTVolume(arrays["hu"].astype(np.float32), arrays["affine"], source=str(path))
    from ct2x.io import load_ct

    return load_ct(path)


def load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def peak_rss_mib() -> float:
    """Peak resident size of this process, MiB: Linux's VmHWM. Not getrusage's ru_maxrss, which in a child process
    also counts the parent's resident size at the fork (exec keeps the larger of the two)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def machine_facts(device: str) -> Dict[str, Any]:
    import torch

    model = platform.processor() or platform.machine()
    flags: List[str] = []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and model in ("", "x86_64", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16") if f in present]
                break
    memory_gib = None
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        memory_gib = int(meminfo.read_text().split()[1]) / 2**20
    facts = {"cpu": model, "cores": os.cpu_count(), "cpu_flags": flags, "memory_gib": memory_gib,
             "python": platform.python_version(), "torch": torch.__version__,
             "mkldnn": bool(torch.backends.mkldnn.is_available())}
    if device.startswith("cuda") and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(torch.device(device))
        facts["cuda"] = torch.version.cuda
    return facts


# ----------------------------------------------------------------------------------------------- films and weights
def films(data_dir: Path, size: int) -> Dict[str, Any]:
    """{"pa", "lateral": (size, size) float32 in [0, 1], "source": text}, cached in WORK."""
    cache = WORK / f"films_{size}.npz"
    if cache.exists():
        with np.load(cache) as arrays:
            return {"pa": arrays["pa"], "lateral": arrays["lateral"], "source": str(arrays["source"])}
    import torch

    from ct2x.data.x2ct_convention import CUBE_MM, ct_cube, official_films

    torch.set_num_threads(os.cpu_count() or 1)
    chest = data_dir / CHEST_CT
    if chest.exists():
        from ct2x.io import load_ct

        volume, source = load_ct(chest), f"real chest CT {CHEST_CT}"
    else:
        from ct2x.phantoms import chest as chest_phantom

        volume, source = chest_phantom(), "built-in chest phantom (no real CT in --data-dir)"
    cube = ct_cube(volume, voxels=int(round(CUBE_MM)), cube_mm=CUBE_MM)  # 1 mm, as `ct2x prepare recon`
    pa, lateral = official_films(cube, size)
    source = f"PA and lateral films ({size}^2) of the {source}, X2CT-GAN's convention (ct2x.data.x2ct_convention)"
    WORK.mkdir(parents=True, exist_ok=True)
    np.savez(cache, pa=pa, lateral=lateral, source=np.array(source))
    return {"pa": pa, "lateral": lateral, "source": source}


def default_network(kind: str):
    """The `kind` generator in its default configuration, random initialisation (seed 0)."""
    import importlib

    import torch

    from ct2x import models

    module, config = KINDS[kind]
    torch.manual_seed(WEIGHT_SEED)
    return models.build_network(kind, getattr(importlib.import_module(module), config)().to_dict())


def random_model_file(kind: str) -> Path:
    """A model file of the `kind` generator at its default size with random initialisation (seed 0), written once."""
    path = WORK / f"{kind.replace('-', '_')}_official_init_seed{WEIGHT_SEED}.safetensors"
    if not path.exists():
        from ct2x import models

        network = default_network(kind)
        info = models.ModelInfo(kind=kind, config=network.config.to_dict(), license="CC0-1.0",
                                description="random initialisation, for benchmarks only")
        WORK.mkdir(parents=True, exist_ok=True)
        models.save_model(path, network, info)
    return path


# ------------------------------------------------------------------------------------------ worker: a configuration
def build_network(job: Dict[str, Any]):
    """The generator (eval mode, on the job's device) and its input size; seconds it took."""
    from ct2x import models

    start = time.perf_counter()
    if job.get("model"):
        network, info = models.load(job["model"], device=job["device"])
        if info.kind == "x2ct-single" or info.inputs.get("films", ["pa", "lateral"]) != ["pa", "lateral"]:
            raise SystemExit(f"{job['model']}: a {info.kind} model; this benchmark runs biplanar films -> CT networks")
    else:
        network = default_network(job["network"]).eval().to(job["device"])
    return network, int(network.config.input_size), time.perf_counter() - start


class _Float32(object):
    """Wraps a module's forward so that it runs with autocast off (in float32 when its inputs are)."""

    def __init__(self, forward: Callable, device_type: str) -> None:
        self.forward, self.device_type = forward, device_type

    def __call__(self, *args, **kwargs):
        import torch

        with torch.autocast(self.device_type, enabled=False):
            return self.forward(*args, **kwargs)


def configure(network, job: Dict[str, Any]):
    """The network set up as the job's configuration says; (network, input dtype, autocast context factory)."""
    import torch
    from torch import nn

    device_type = torch.device(job["device"]).type
    precision = job["precision"]
    if device_type == "cuda":
        tf32 = precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if dtype != torch.float32:
        network = network.to(dtype)
    if job.get("cl"):  # 5-D weights only (the 2-D encoder's and Linear's cannot take channels_last_3d)
        for module in network.modules():
            if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
    autocast: Callable[[], Any] = contextlib.nullcontext
    if precision.startswith("autocast"):
        low = torch.bfloat16 if "bf16" in precision else torch.float16

        def autocast() -> Any:
            return torch.autocast(device_type, dtype=low)

        if precision.endswith("-3d"):  # the 2-D encoders and Connection-A (Linear) in float32
            for branch in (network.pa, network.lateral):
                for module in (branch.encoder, branch.to_volume):
                    module.forward = _Float32(module.forward, device_type)
    if job.get("compile"):
        network = torch.compile(network)
    return network, dtype, autocast


def make_reconstruct(network, dtype, autocast, device: str, size: int, precision: str,
                     kind: str) -> Tuple[Callable, str]:
    """(reconstruct(pa, lateral): numpy films (S, S) in [0, 1] -> (HU volume (S, S, S) float32 numpy, the network's
    raw output as numpy), what it calls). The project's `ct2x.reconstruct.reconstruct` (network, clamp to [0, 1],
    HU, CTVolume) with the configured network in a LoadedModel and the films as PreparedFilms; where that is missing
    (an older ct2x), the same steps here. precision: the configuration's; ct2x-bf16 asks ct2x for its bf16 path."""
    import torch
    from torch import nn

    class Configured(nn.Module):
        """The network as configured: films cast to its dtype, run under the configuration's autocast; float32 out."""

        def __init__(self) -> None:
            super().__init__()
            self.network = network
            self.raw: Optional[torch.Tensor] = None

        def forward(self, pa: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
            with autocast():
                output = self.network(pa.to(dtype), lateral.to(dtype))
            self.raw = output
            return output.float()

    configured = Configured()
    try:
        from ct2x.data.films import PreparedFilm
        from ct2x.models import LoadedModel, ModelInfo
        from ct2x.reconstruct import reconstruct as project_reconstruct
    except ImportError:
        from ct2x.preprocess import x2ct_denormalize

        def reconstruct(pa: np.ndarray, lateral: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
            with torch.inference_mode():
                inputs = [torch.from_numpy(film)[None, None].to(device) for film in (pa, lateral)]
                volume = configured(*inputs)[0, 0].float()  # (D, H, W), X2CT-GAN's [0, 1] scale
                hu = x2ct_denormalize(volume.clamp(0.0, 1.0)).cpu().numpy()
            return hu, configured.raw[0, 0].float().cpu().numpy()

        return reconstruct, "the benchmark's own films -> HU steps (this ct2x has no ct2x.reconstruct)"

    info = ModelInfo(kind=kind, config={"input_size": size}, license="benchmark",
                     inputs={"films": ["pa", "lateral"], "film_px": size},
                     outputs={"volume": "(N, 1, D, H, W), X2CT normalisation", "voxels": size})
    loaded = LoadedModel(configured, info)

    def reconstruct(pa: np.ndarray, lateral: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        films = PreparedFilm(pa, ("benchmark",)), PreparedFilm(lateral, ("benchmark",))
        if precision == "ct2x-bf16":
            volume = project_reconstruct(loaded, *films, device=device, precision="bf16")
        else:
            volume = project_reconstruct(loaded, *films, device=device)
        return volume.hu, configured.raw[0, 0].float().cpu().numpy()

    return reconstruct, "ct2x.reconstruct.reconstruct"


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def timed_call(call: Callable, device: str) -> Dict[str, Any]:
    synchronize(device)
    before, cpu, start = cpu_snapshot(), time.process_time(), time.perf_counter()
    result = call()
    synchronize(device)
    wall = time.perf_counter() - start
    return {"result": result, "s": wall, "cpu_s": time.process_time() - cpu,
            "foreign_percent": foreign_cpu_percent(before, cpu_snapshot())}


def run_reconstruct(job: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    device = job["device"]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    network, size, build_s = build_network(job)
    pa, lateral = (np.load(job["films"])[name] for name in ("pa", "lateral"))
    if pa.shape != (size, size):
        raise SystemExit(f"films are {pa.shape}, the network takes ({size}, {size})")
    cache = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/nonexistent"))
    compile_cache_warm = cache.is_dir() and any(cache.iterdir())
    network, dtype, autocast = configure(network, job)
    reconstruct, timed_function = make_reconstruct(network, dtype, autocast, device, size, job["precision"],
                                                   job["network"])
    load_before = load_average()
    first = timed_call(lambda: reconstruct(pa, lateral), device)
    calls = [timed_call(lambda: reconstruct(pa, lateral), device) for _ in range(job["repeats"])]
    hu, raw = calls[-1]["result"]
    np.save(job["out"], raw)
    result = {
        "timed_function": timed_function, "build_s": build_s, "first_s": first["s"],
        "first_foreign_percent": first["foreign_percent"],
        "s": [c["s"] for c in calls], "cpu_s": [c["cpu_s"] for c in calls],
        "foreign_percent": [c["foreign_percent"] for c in calls], "peak_rss_mib": peak_rss_mib(),
        "load_average": [load_before, load_average()], "threads": torch.get_num_threads(),
        "hu_range": [float(hu.min()), float(hu.max())], "raw_mean": float(raw.mean()), "raw_std": float(raw.std()),
        "raw_nonzero": float((raw > 0).mean()),
    }
    if job.get("compile"):
        result["compile_cache_warm"] = compile_cache_warm
    if device.startswith("cuda"):
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    return result


def run_load(job: Dict[str, Any]) -> Dict[str, Any]:
    """Time ct2x.models.load(FILE) and its parts: building the network (with its random initialisation), reading
    the tensors, load_state_dict."""
    import torch
    from safetensors import safe_open

    from ct2x import models

    import_s = job["import_s"]
    path, device = job["model_file"], job["device"]
    times = []
    for _ in range(job["repeats"]):
        start = time.perf_counter()
        network, info = models.load(path, device=device)
        synchronize(device)
        times.append(time.perf_counter() - start)
        del network
    start = time.perf_counter()
    network = models.build_network(info.kind, info.config)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    network.load_state_dict(tensors)
    network.to(device).eval()
    synchronize(device)
    state_s = time.perf_counter() - start
    return {"import_s": import_s, "s": times, "build_s": build_s, "read_s": read_s, "load_state_dict_s": state_s,
            "file_mib": Path(path).stat().st_size / 2**20, "peak_rss_mib": peak_rss_mib(),
            "threads": torch.get_num_threads(), "load_average": [load_average()]}


# ----------------------------------------------------------------------------------------------- worker: profile
def op_category(name: str, shapes: List[Any]) -> str:
    """The op type of a top-level aten op, by its name and the rank of its first input."""
    rank = len(shapes[0]) if shapes and isinstance(shapes[0], (list, tuple)) else 0
    if name in ("aten::conv3d", "aten::convolution", "aten::_convolution"):
        if rank == 5 and len(shapes) > 1 and shapes[1] and shapes[1][0] == 1:
            return "3-D convolution to 1 channel (output head)"
        return "3-D convolution" if rank == 5 else "2-D convolution"
    if name in ("aten::conv_transpose3d", "aten::conv_transpose2d"):
        return "3-D transposed convolution"
    if name == "aten::conv2d":
        return "2-D convolution"
    if name in ("aten::instance_norm", "aten::group_norm", "aten::batch_norm", "aten::native_batch_norm"):
        return "instance norm 3-D" if rank == 5 else "instance norm 2-D"
    if name in ("aten::relu", "aten::relu_", "aten::clamp_min", "aten::clamp_min_"):
        return "ReLU"
    if name == "aten::cat":
        return "cat"
    if name in ("aten::contiguous", "aten::clone", "aten::copy_", "aten::permute", "aten::expand"):
        return "copies (permutes, expands, layouts)"
    if name in ("aten::to", "aten::_to_copy"):
        return "dtype casts"
    if name in ("aten::add", "aten::add_", "aten::div", "aten::div_", "aten::mul", "aten::mul_", "aten::sub",
                "aten::zeros", "aten::new_zeros", "aten::fill_", "aten::zero_"):
        return "element-wise (fusion average, sums)"
    if name in ("aten::linear", "aten::addmm", "aten::adaptive_avg_pool2d", "aten::reflection_pad2d"):
        return "Linear, pooling, padding"
    return "other"


def stage_hooks(kind: str, size: int) -> List[Tuple[str, str, str]]:
    """(module path, "pre" or "post", the stage that ends when that module's forward starts or returns), in execution
    order. Decoder level j works at size / 2^j and ends with its up-convolution (level 0 with the fusion decoder;
    CVAA-GAN's with its compressing conv, which follows the level's CVAA module)."""
    if kind == "cvaa-biplanar":
        return [
            ("pa.encoder", "post", "PA film: 2-D encoder"),
            ("lateral.encoder", "pre", "PA film: Connection-A and -B (to 3-D)"),
            ("lateral.encoder", "post", "lateral film: 2-D encoder"),
            ("levels.5", "pre", "lateral film: Connection-A and -B (to 3-D)"),
        ] + [(f"levels.{j}.up", "post", f"decoder level {j} ({size >> j}^3): CVAA, conv, up-conv")
             for j in range(5, 0, -1)] + [
            ("levels.0.compress.relu", "post", f"decoder level 0 ({size}^3): CVAA, conv"),
            ("head", "post", "output head (7^3 conv to 1 channel, ReLU)"),
        ]
    return [
        ("pa.encoder", "post", "PA film: 2-D encoder"),
        ("lateral.encoder", "pre", "PA film: Connection-A and -B (to 3-D)"),
        ("lateral.encoder", "post", "lateral film: 2-D encoder"),
        ("fusion_levels.5", "pre", "lateral film: Connection-A and -B (to 3-D)"),
    ] + [(f"lateral.levels.{j}.up", "post", f"decoder level {j} ({size >> j}^3)") for j in range(5, 0, -1)] + [
        ("fusion_levels.0", "post", f"decoder level 0 ({size}^3)"),
        ("fusion_head", "post", "output head (7^3 conv to 1 channel, ReLU)"),
    ]


def vm_status() -> Dict[str, float]:
    """VmHWM and VmRSS of this process, MiB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            values[line.split(":")[0]] = int(line.split()[1]) / 1024.0
    return values


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
        return True
    except OSError:
        return False


def run_profile(job: Dict[str, Any]) -> Dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    device = job["device"]
    network, size, _ = build_network(job)
    pa, lateral = (np.load(job["films"])[name] for name in ("pa", "lateral"))
    modules = dict(network.named_modules())
    network, dtype, autocast = configure(network, job)
    reconstruct, _ = make_reconstruct(network, dtype, autocast, device, size, job["precision"], job["network"])
    reconstruct(pa, lateral)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities, record_shapes=True) as prof:
        timed = timed_call(lambda: reconstruct(pa, lateral), device)
    categories: Dict[str, float] = {}
    on_gpu = device.startswith("cuda")
    for event in prof.events():
        if event.cpu_parent is None and event.name.startswith("aten::"):
            key = op_category(event.name, event.input_shapes)
            spent = getattr(event, "device_time_total", 0.0) if on_gpu else event.cpu_time_total  # us
            categories[key] = categories.get(key, 0.0) + spent / 1e3  # ms
    top = sorted(((e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()),
                 key=lambda row: -row[1])[:8]
    del prof
    gc.collect()

    # stages: time and peak resident size, by forward hooks at the stage boundaries
    marks: List[Tuple[str, float, Dict[str, float]]] = []
    can_reset = reset_peak()

    def mark(stage: str) -> Callable:
        def hook(*_: Any) -> None:
            synchronize(device)
            marks.append((stage, time.perf_counter(), vm_status()))
            reset_peak()
        return hook

    handles = [modules[path].register_forward_pre_hook(mark(stage)) if when == "pre" else
               modules[path].register_forward_hook(mark(stage))
               for path, when, stage in stage_hooks(job["network"], size) if path in modules]
    synchronize(device)
    reset_peak()
    before = vm_status()
    start = time.perf_counter()
    reconstruct(pa, lateral)
    for handle in handles:
        handle.remove()
    stages, previous = [], start
    for stage, when, status in marks:
        stages.append({"stage": stage, "ms": (when - previous) * 1e3, "peak_rss_mib": status.get("VmHWM"),
                       "rss_after_mib": status.get("VmRSS")})
        previous = when
    return {"wall_s": timed["s"], "categories_ms": categories, "top_ops": top, "stages": stages,
            "rss_before_mib": before.get("VmRSS"), "peak_reset_worked": can_reset, "threads": torch.get_num_threads(),
            "foreign_percent": timed["foreign_percent"], "load_average": [load_average()]}


def worker(job: Dict[str, Any]) -> Dict[str, Any]:
    start = time.perf_counter()
    import torch

    import ct2x.models  # noqa: F401
    import ct2x.nets.x2ct  # noqa: F401

    job["import_s"] = time.perf_counter() - start
    torch.set_num_threads(job["threads"])
    result = {"kind": job["kind"], "ct2x": str(Path(ct2x.__file__).resolve().parent), "import_s": job["import_s"]}
    runner = {"reconstruct": run_reconstruct, "load": run_load, "profile": run_profile}[job["kind"]]
    result.update(runner(job))
    return result


# ----------------------------------------------------------------------------------------------- parent
def run_worker(job: Dict[str, Any], ct2x_dir: Optional[Path], timeout_s: float) -> Dict[str, Any]:
    env = dict(os.environ)
    if ct2x_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(ct2x_dir)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["OMP_NUM_THREADS"] = str(job["threads"])
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(WORK / "inductor_cache"))  # kept: a second run compiles warm
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit status {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def relative_l2(value: np.ndarray, reference: np.ndarray) -> float:
    value, reference = value.astype(np.float64), reference.astype(np.float64)
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


def mean_hu_difference(value: np.ndarray, reference: np.ndarray) -> float:
    """Mean |difference| of the HU volumes (clamped to [0, 1], x 2500)."""
    return float(np.mean(np.abs(np.clip(value, 0, 1) - np.clip(reference, 0, 1))) * 2500.0)


def fmt(value: Optional[float], digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def fmt_rel(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return "0 (bitwise)" if value == 0 else f"{value:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (cpu)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (all cores)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first (3)")
    parser.add_argument("--configs", help="comma-separated names (all): " + ", ".join(CPU_CONFIGS) + ", load, "
                        "profile; on CUDA " + ", ".join(c for c in CUDA_CONFIGS if c not in CPU_CONFIGS))
    parser.add_argument("--profile", action="store_true", help="also profile fp32 and the bf16 path")
    parser.add_argument("--kind", action="append", choices=KINDS,
                        help="network, random initialisation at its default size (x2ct-biplanar); repeat it to time "
                             "several in one run, each configuration of each in turn")
    parser.add_argument("--model", type=Path, help="a CT2X biplanar films -> CT model file (instead of --kind)")
    parser.add_argument("--ct2x", type=Path, action="append",
                        help="import ct2x from DIR (a patched copy holding ct2x/; '.' = this checkout); repeat it to "
                             "compare copies in one run, each configuration of each copy in turn")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("CT2X_DATA_DIR", "../shared/data")))
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per worker (600)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here")
    configs = CUDA_CONFIGS if cuda else CPU_CONFIGS
    names = list(configs) + [LOAD]
    if args.configs:
        names = [name.strip() for name in args.configs.split(",") if name.strip()]
        unknown = [name for name in names if name not in configs and name not in (LOAD, PROFILE)]
        if unknown:
            raise SystemExit(f"unknown configuration(s) {unknown}; known: {list(configs)}, load, profile")
    if args.profile and PROFILE not in names:
        names.append(PROFILE)
    if names[0] != "fp32" and "fp32" in configs and any(name in configs for name in names):
        names.insert(0, "fp32")  # the agreement reference

    if args.model is not None and args.kind:
        raise SystemExit("--kind and --model exclude each other: the model file says its kind")
    size, kinds = 128, args.kind or ["x2ct-biplanar"]
    if args.model is not None:
        from ct2x.models import read_info

        info = read_info(args.model)
        size, kinds = int(info.config.get("input_size", 128)), [info.kind]
    # targets: each kind with each ct2x copy; a label, an output folder and an agreement reference each
    directories: List[Optional[Path]] = [None if d is None or d.resolve() == BENCH.parent else d.resolve()
                                         for d in (args.ct2x or [None])]
    targets = [(kind, d) for kind in dict.fromkeys(kinds) for d in directories]
    copies = [d for _, d in targets]
    labels = [("" if len(kinds) == 1 else kind + ", ") + ("this checkout" if d is None else d.name)
              for kind, d in targets]
    weights = "seed0" if args.model is None else args.model.stem
    device_tag = f"{weights}_{args.device.replace(':', '')}_{args.threads}t"

    def out_dir_of(kind: str, directory: Optional[Path]) -> Path:  # X2CT-GAN's keeps its earlier name
        return WORK / (f"{'head' if directory is None else directory.name}_"
                       f"{'' if kind == 'x2ct-biplanar' else kind + '_'}{device_tag}")

    out_dirs = [out_dir_of(kind, d) for kind, d in targets]
    for out_dir in out_dirs:
        out_dir.mkdir(parents=True, exist_ok=True)
    references = [next(i for i, (other, _) in enumerate(targets) if other == kind) for kind, _ in targets]
    film = films(args.data_dir, size)
    films_path = WORK / f"films_{size}.npz"
    model_files = {kind: args.model if args.model is not None else random_model_file(kind) if LOAD in names else None
                   for kind in kinds}

    facts = machine_facts(args.device)
    started = time.time()
    load_start = load_average()
    print(f"{facts['cpu']}, {facts['cores']} cores ({', '.join(facts['cpu_flags']) or 'no AVX-512'}), "
          f"{fmt(facts['memory_gib'], 0)} GiB, Python {facts['python']}, torch {facts['torch']}"
          + (f", GPU {facts.get('gpu')} (CUDA {facts.get('cuda')})" if cuda else "")
          + f"; {args.threads} threads; load average {fmt(load_start)} at the start", flush=True)
    print(f"weights: {'random initialisation (seed 0), default size' if args.model is None else args.model}; "
          f"{film['source']}; ct2x: {', '.join(labels)}\n", flush=True)

    results: List[Dict[str, Dict[str, Any]]] = [{} for _ in targets]
    for name in names:
        if name == PROFILE:
            continue  # after the timings
        for index, ((kind, copy), label, out_dir) in enumerate(zip(targets, labels, out_dirs)):
            job: Dict[str, Any] = {"device": args.device, "threads": args.threads, "repeats": args.repeats,
                                   "films": str(films_path), "model": str(args.model) if args.model else None,
                                   "network": kind}
            if name == LOAD:
                job.update(kind="load", model_file=str(model_files[kind]))
            else:
                job.update(kind="reconstruct", out=str(out_dir / f"out_{name}.npy"), **configs[name])
                job["threads"] = configs[name].get("threads") or args.threads
            print(f"  {name}{'' if len(targets) == 1 else ', ' + label} ...", end="", flush=True)
            result = results[index][name] = run_worker(job, copy, args.timeout)
            print(f" {result['error']}" if "error" in result else
                  f" {fmt(statistics.median(result['s']))} s" + (f" (first {fmt(result['first_s'])} s)"
                                                                  if "first_s" in result else ""), flush=True)
    profiles: List[Dict[str, Dict[str, Any]]] = [{} for _ in targets]
    if PROFILE in names:
        for name in ("fp32", BF16_PATH["cuda" if cuda else "cpu"]):
            for index, ((kind, copy), label) in enumerate(zip(targets, labels)):
                job = {"device": args.device, "threads": args.threads, "films": str(films_path), "kind": "profile",
                       "model": str(args.model) if args.model else None, "network": kind, **configs[name]}
                print(f"  profile {name}{'' if len(targets) == 1 else ', ' + label} ...", end="", flush=True)
                profiles[index][name] = run_worker(job, copy, args.timeout)
                print(f" {profiles[index][name].get('error', 'done')}", flush=True)

    # agreement: with this run's fp32 of the same copy and kind, and with the kind's first copy's output of the same
    # configuration (with one patched copy only: the unpatched checkout's output from an earlier run, same weights
    # and threads)
    for index, out_dir in enumerate(out_dirs):
        kind, reference = targets[index][0], references[index]
        reference_dir = out_dirs[reference] if index != reference else \
            out_dir_of(kind, None) if copies[index] is not None else None
        for name, result in results[index].items():
            path = out_dir / f"out_{name}.npy"
            if name == LOAD or "error" in result or not path.exists():
                continue
            value = np.load(path)
            if (out_dir / "out_fp32.npy").exists():
                reference = np.load(out_dir / "out_fp32.npy")
                result["rel_l2_vs_fp32"] = relative_l2(value, reference)
                result["mean_abs_hu_vs_fp32"] = mean_hu_difference(value, reference)
            if reference_dir is not None and (reference_dir / path.name).exists():
                result["rel_l2_vs_reference"] = relative_l2(value, np.load(reference_dir / path.name))
    reference_label = "the kind's first ct2x" if len(directories) > 1 else \
        "this checkout (earlier run)" if directories[0] else None

    load_end = load_average()
    print(f"\n{args.device.upper()}, torch {facts['torch']}, median of {args.repeats} calls after a first one; "
          f"load average {fmt(load_start)} at the start, {fmt(load_end)} at the end; "
          f"{(time.time() - started) / 60:.1f} min")
    for label, result, profile in zip(labels, results, profiles):
        print_tables(args, label, result, profile, reference_label)
    if len(targets) > 1:
        print_comparison(labels, results, references)
    busy = [f"{name}{'' if len(targets) == 1 else ' (' + label + ')'} ({statistics.median(foreign):.0f} %)"
            for label, result in zip(labels, results) for name, r in result.items()
            for foreign in [[f for f in r.get("foreign_percent", []) if f is not None]]
            if foreign and statistics.median(foreign) > FOREIGN_WARN_PERCENT]
    if busy:
        print(f"\nWarning: other processes used the CPU while timing {', '.join(busy)} (median share of the "
              "machine); those times are unreliable: run again on a quiet machine.")
    for out_dir, result, profile in zip(out_dirs, results, profiles):
        (out_dir / "results.json").write_text(json.dumps(
            {"machine": facts, "args": {k: str(v) for k, v in vars(args).items()}, "results": result,
             "profiles": profile, "load_average": [load_start, load_end]}, indent=1))


def print_tables(args, label: str, results, profiles, reference_label: Optional[str]) -> None:
    cuda = args.device.startswith("cuda")
    configs = CUDA_CONFIGS if cuda else CPU_CONFIGS
    timed = sorted({r["timed_function"] for r in results.values() if "timed_function" in r})
    print(f"\nct2x: {label}. Timed: films (numpy) in -> HU volume out by {' / '.join(timed) or '-'}; "
          "the model is built before.\n")
    with_reference = reference_label is not None and any("rel_l2_vs_reference" in r for r in results.values())
    header = ("| configuration | what | threads | first call s | median s | min-max s | CPU s per call | "
              + "foreign CPU % | " + ("peak GPU MiB | " if cuda else "")
              + "peak RSS MiB | rel L2 vs fp32 | mean abs HU vs fp32 |"
              + (f" rel L2 vs {reference_label}, same configuration |" if with_reference else ""))
    print(header)
    print("|" + "---|" * header.count(" |"))
    for name, result in results.items():
        if name == LOAD:
            continue
        if "error" in result:
            print(f"| {name} | failed: {result['error'][:120]} |")
            continue
        times, foreign = result["s"], [f for f in result["foreign_percent"] if f is not None]
        row = (f"| {name} | {configs[name]['what']} | {result['threads']} | {fmt(result['first_s'])} | "
               f"**{fmt(statistics.median(times))}** | {fmt(min(times))}-{fmt(max(times))} | "
               f"{fmt(statistics.median(result['cpu_s']))} | "
               f"{fmt(statistics.median(foreign) if foreign else None, 0)} | "
               + (f"{fmt(result.get('cuda_peak_mib'), 0)} | " if cuda else "")
               + f"{fmt(result['peak_rss_mib'], 0)} | {fmt_rel(result.get('rel_l2_vs_fp32'))} | "
               f"{fmt(result.get('mean_abs_hu_vs_fp32'), 1)} |"
               + (f" {fmt_rel(result.get('rel_l2_vs_reference'))} |" if with_reference else ""))
        print(row)
    if LOAD in results:
        result = results[LOAD]
        print()
        if "error" in result:
            print(f"Model file load failed: {result['error']}")
        else:
            print("| model file | MiB | import torch + ct2x s | load first s | load median s | "
                  "of which: build + random init s | read tensors s | load_state_dict + to(device) s | peak RSS MiB |")
            print("|---|---|---|---|---|---|---|---|---|")
            times = result["s"]
            print(f"| {Path(args.model).name if args.model else 'random official init (seed 0)'} | "
                  f"{fmt(result['file_mib'], 0)} | {fmt(result['import_s'])} | {fmt(times[0])} | "
                  f"{fmt(statistics.median(times))} | {fmt(result['build_s'])} | {fmt(result['read_s'])} | "
                  f"{fmt(result['load_state_dict_s'])} | {fmt(result['peak_rss_mib'], 0)} |")
    for name, profile in profiles.items():
        print()
        if "error" in profile:
            print(f"Profile of {name} failed: {profile['error']}")
            continue
        total = sum(profile["categories_ms"].values())
        print(f"Where the time goes, {name} (torch.profiler, one call of {fmt(profile['wall_s'])} s, "
              f"{profile['threads']} threads, foreign CPU {fmt(profile['foreign_percent'], 0)} %; top-level ops by "
              f"type, {'GPU' if args.device.startswith('cuda') else 'CPU'} time incl. children):\n")
        print("| op type | ms | share |")
        print("|---|---|---|")
        for key, ms in sorted(profile["categories_ms"].items(), key=lambda item: -item[1]):
            print(f"| {key} | {ms:.0f} | {100 * ms / total:.0f} % |")
        print(f"\nBy stage, {name} (wall ms and peak resident size within the stage; "
              f"{fmt(profile['rss_before_mib'], 0)} MiB resident before the call):\n")
        print("| stage | ms | peak RSS MiB |")
        print("|---|---|---|")
        for stage in profile["stages"]:
            print(f"| {stage['stage']} | {stage['ms']:.0f} | {fmt(stage['peak_rss_mib'], 0)} |")


def print_comparison(labels: List[str], results: List[Dict[str, Dict[str, Any]]], references: List[int]) -> None:
    """One row per copy (and kind) and configuration: median, ratio to the kind's first copy (same run), peak,
    agreement with that copy's output."""
    print("\nCompared in this run (ratio = median / the median of the kind's first ct2x, same configuration):\n")
    print("| configuration | ct2x | median s | ratio | CPU s per call | foreign CPU % | peak RSS MiB | "
          "rel L2 vs the kind's first ct2x |")
    print("|---|---|---|---|---|---|---|---|")
    for name in results[0]:
        if name == LOAD:
            continue
        for index, (label, result) in enumerate(zip(labels, (r.get(name, {}) for r in results))):
            if "s" not in result:
                print(f"| {name} | {label} | {result.get('error', 'not run')[:80]} |")
                continue
            base = results[references[index]].get(name, {})
            median = statistics.median(result["s"])
            ratio = median / statistics.median(base["s"]) if "s" in base else None
            foreign = [f for f in result["foreign_percent"] if f is not None]
            agreement = "(reference)" if references[index] == index else fmt_rel(result.get("rel_l2_vs_reference"))
            print(f"| {name} | {label} | {fmt(median)} | {fmt(ratio)} | {fmt(statistics.median(result['cpu_s']))} | "
                  f"{fmt(statistics.median(foreign) if foreign else None, 0)} | {fmt(result['peak_rss_mib'], 0)} | "
                  f"{agreement} |")


if __name__ == "__main__":
    main()
