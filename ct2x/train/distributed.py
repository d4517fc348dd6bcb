"""Several training processes without DistributedDataParallel: for objectives whose losses call a network's methods
rather than its forward (CT2X-GAN's), which DDP's wrapper does not see.

The networks are made equal once (the first process's weights and buffers sent to all), then after each backward
every gradient is averaged over the processes, so every process takes the same optimiser step, as under DDP.
BatchNorm running statistics stay each process's own; the first process's are the ones saved.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def several_processes() -> bool:
    """Whether this process is one of several (torchrun, process group initialised)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def share_first_process_weights(network: torch.nn.Module) -> None:
    """Every parameter and buffer of `network` set to the first process's."""
    if several_processes():
        for tensor in network.state_dict().values():
            dist.broadcast(tensor, src=0)


def average_gradients(network: torch.nn.Module) -> None:
    """Each parameter's gradient replaced by its mean over the processes (all in one flat all-reduce)."""
    if not several_processes():
        return
    parameters = [p for p in network.parameters() if p.grad is not None]
    if not parameters:
        return
    flat = torch.cat([p.grad.flatten() for p in parameters])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for parameter, gradient in zip(parameters, flat.split([p.numel() for p in parameters])):
        parameter.grad.copy_(gradient.view_as(parameter.grad))
