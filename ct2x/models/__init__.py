"""Model files, registry and weight import.

    from ct2x import models
    network, info = models.load(models.download("NAME"), device="cuda")   # registry name -> verified cached file
    models.save_model("mine.safetensors", network, info)

Importing this package imports neither torch nor safetensors; the functions that need them import them.
"""

from ct2x.models.architectures import ARCHITECTURES, build_network, known_kinds, register_architecture
from ct2x.models.cache import (
    CACHE_ENV,
    DownloadError,
    cache_path,
    cache_root,
    cache_state,
    cached_path,
    download,
    model_path,
)
from ct2x.models.model_file import (
    FORMAT_VERSION,
    LoadedModel,
    ModelHeader,
    ModelInfo,
    NewerFormatError,
    load,
    read_header,
    read_info,
    save_model,
)
from ct2x.models.registry import ManualDownload, RegistryEntry, find_model, load_registry

__all__ = [
    "ARCHITECTURES", "CACHE_ENV", "FORMAT_VERSION", "DownloadError", "LoadedModel", "ManualDownload", "ModelHeader",
    "ModelInfo", "NewerFormatError", "RegistryEntry", "build_network", "cache_path", "cache_root", "cache_state",
    "cached_path", "download", "find_model", "known_kinds", "load", "load_registry", "model_path", "read_header",
    "read_info", "register_architecture", "save_model",
]
