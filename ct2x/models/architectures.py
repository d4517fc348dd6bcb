"""Network architectures by kind: a model file's "kind" names one; its "config" holds the constructor's arguments.

Adding a kind is one line in `ARCHITECTURES`, "kind": "module:callable" (as the entries there); the module is imported
only when a network of that kind is built, so importing ct2x.models stays cheap. Code outside ct2x (and tests) calls
`register_architecture(kind, build)`.
A constructor takes JSON values only (numbers, strings, lists, dicts) and returns a torch.nn.Module.
"""

from __future__ import annotations

import importlib
import json
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Union

from ct2x.errors import CT2XInputError

if TYPE_CHECKING:
    import torch

Builder = Union[str, Callable[..., "torch.nn.Module"]]  # "module:callable", or the callable itself

ARCHITECTURES: Dict[str, Builder] = {
    "x2ct-biplanar": "ct2x.nets.x2ct:build_generator",  # X2CT-GAN+B: PA + lateral films -> CT
    "x2ct-single": "ct2x.nets.x2ct:build_single_view_generator",  # X2CT-GAN+S: PA film -> CT
    "patch-discriminator-3d": "ct2x.nets.patch_discriminator:build_patch_discriminator",  # X2CT-GAN's conditional D
    "cvaa-biplanar": "ct2x.nets.cvaa:build_generator",  # CVAA-GAN: PA + lateral films -> CT
    "cvaa-discriminator-3d": "ct2x.nets.cvaa:build_discriminator",  # CVAA-GAN's conditional D (films lifted)
    "ct2x-gan": "ct2x.nets.ct2x_gan:build_generator",  # CT2X-GAN's generator side: CT + pose + style film -> film
    "ct2x-gan-discriminator": "ct2x.nets.ct2x_gan_discriminator:build_discriminator",  # its pose-aware D
}


def register_architecture(kind: str, build: Builder) -> None:
    """Make `kind` buildable by `build(**config)`; ValueError when `kind` is already taken by another builder."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"architecture kind must be a non-empty string, got {kind!r}")
    if ARCHITECTURES.get(kind, build) != build:
        raise ValueError(f"architecture kind {kind!r} is already registered to {ARCHITECTURES[kind]!r}")
    ARCHITECTURES[kind] = build


def known_kinds() -> List[str]:
    return sorted(ARCHITECTURES)


def build_network(kind: str, config: Dict[str, Any]) -> torch.nn.Module:
    """A new network of `kind` built from `config` (randomly initialised); CT2XInputError for an unknown kind or a
    configuration its constructor rejects."""
    if kind not in ARCHITECTURES:
        known = ", ".join(known_kinds()) or "none"
        raise CT2XInputError(f"unknown model kind {kind!r} (this ct2x builds: {known})")
    build = _resolve(ARCHITECTURES[kind])
    try:
        network = build(**config)
    except (TypeError, ValueError) as error:
        raise CT2XInputError(f"the {kind} constructor rejects the configuration {json.dumps(config)}: "
                             f"{error}") from None
    import torch

    if not isinstance(network, torch.nn.Module):
        raise TypeError(f"the {kind} builder {ARCHITECTURES[kind]!r} returned {type(network).__name__}, not a "
                        "torch.nn.Module")
    return network


def _resolve(build: Builder) -> Callable[..., torch.nn.Module]:
    """The callable itself, or the one a "module:callable" string names (imported now)."""
    if callable(build):
        return build
    module_name, _, attribute = build.partition(":")
    return getattr(importlib.import_module(module_name), attribute)
