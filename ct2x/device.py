"""Torch devices by name ("cpu", "cuda", "cuda:N"), checked before any work with a message saying what is wrong."""

from __future__ import annotations

from typing import List, Tuple, Union

import torch

from ct2x.errors import CT2XInputError


def torch_device(name: Union[str, torch.device]) -> torch.device:
    """The torch.device called `name`, or CT2XInputError saying why it cannot be used on this computer."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise CT2XInputError(f"device {name!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise CT2XInputError(f"device {name!r}: only cpu and cuda devices are supported")
    if not torch.cuda.is_available():
        reason = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise CT2XInputError(f"device {name!r}: CUDA is not available ({reason}); use cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise CT2XInputError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here, numbered from 0")
    return device


def available_devices() -> List[Tuple[str, str]]:
    """(device name, label) of each device torch can use here: the CPU, then each CUDA GPU by name."""
    devices = [("cpu", "CPU")]
    if torch.backends.cuda.is_built() and torch.cuda.is_available():
        devices += [(f"cuda:{i}", f"GPU {i}: {torch.cuda.get_device_name(i)}")
                    for i in range(torch.cuda.device_count())]
    return devices
