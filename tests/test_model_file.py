"""CT2X model files (.safetensors + ModelInfo metadata) and the architecture table, with a tiny test network."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ct2x import __version__
from ct2x.cli.main import main
from ct2x.errors import CT2XInputError
from ct2x.models import (
    ModelInfo,
    NewerFormatError,
    architectures,
    build_network,
    load,
    read_header,
    read_info,
    register_architecture,
    save_model,
)
from ct2x.models.model_file import FORMAT_VERSION, METADATA_KEY

KIND = "test-tiny"


class TinyNet(torch.nn.Module):
    """Two 3x3 convolutions with a batch norm: (B, channels, H, W) -> (B, 1, H, W)."""

    def __init__(self, channels: int = 1, hidden: int = 4):
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden must be at least 1, got {hidden}")
        self.first = torch.nn.Conv2d(channels, hidden, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(hidden)
        self.second = torch.nn.Conv2d(hidden, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.norm(self.first(x))))


@pytest.fixture(autouse=True)
def tiny_architecture(monkeypatch):
    """TinyNet registered as KIND for the test only."""
    monkeypatch.setattr(architectures, "ARCHITECTURES", dict(architectures.ARCHITECTURES))
    register_architecture(KIND, TinyNet)


def tiny_info(**changes) -> ModelInfo:
    fields = dict(
        kind=KIND, config={"channels": 2, "hidden": 3}, license="Apache-2.0", description="a test network",
        inputs={"views": ["PA", "lateral"], "size_px": [8, 8], "normalisation": "attenuation scaled to [0, 1]"},
        outputs={"shape_kji": [1, 8, 8], "voxel_size_mm": [2.5, 2.5, 2.5], "hu_mapping": "HU = 2500 x - 1000"},
        training_data={"dataset": "none", "cases": 0}, source={"sha256": "0" * 64},
        metrics={"psnr_db": {"value": 26.5, "convention": "peak 2500 HU", "cases": 102}})
    fields.update(changes)
    return ModelInfo(**fields)


def trained_tiny() -> TinyNet:
    """A TinyNet(channels=2, hidden=3) with non-default weights and batch-norm statistics."""
    torch.manual_seed(0)
    network = TinyNet(channels=2, hidden=3)
    network(torch.randn(4, 2, 8, 8))  # training mode: updates running_mean / running_var
    return network


@pytest.fixture
def model_file(tmp_path) -> Path:
    return save_model(tmp_path / "tiny.safetensors", trained_tiny(), tiny_info())


def raw_file(path: Path, tensors: dict, metadata=None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def tiny_tensors() -> dict:
    return {name: tensor.clone() for name, tensor in trained_tiny().state_dict().items()}


def test_a_saved_model_loads_as_the_same_network_in_eval_mode(model_file):
    original = trained_tiny().eval()
    network, info = load(model_file)

    assert isinstance(network, TinyNet) and not network.training
    films = torch.randn(1, 2, 8, 8)
    torch.testing.assert_close(network(films), original(films), rtol=0, atol=0)
    assert info == tiny_info(created_by=f"ct2x {__version__}")
    assert info.metrics["psnr_db"]["cases"] == 102 and info.format_version == FORMAT_VERSION
    assert read_info(model_file) == info


def test_the_file_is_plain_safetensors_with_the_info_as_json_in_its_header(model_file):
    length = struct.unpack("<Q", model_file.read_bytes()[:8])[0]
    header = json.loads(model_file.read_bytes()[8:8 + length])
    assert json.loads(header["__metadata__"][METADATA_KEY])["kind"] == KIND
    assert set(header) - {"__metadata__"} == set(TinyNet(2, 3).state_dict())
    shapes, dtypes = zip(*read_header(model_file).tensors.values())
    assert (3, 2, 3, 3) in shapes and set(dtypes) == {"F32", "I64"}  # I64: BatchNorm's num_batches_tracked


def test_saving_is_atomic_deterministic_and_gives_an_ordinary_file(model_file, tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    assert model_file.stat().st_mode & 0o777 == 0o666 & ~umask
    again = save_model(tmp_path / "again.safetensors", trained_tiny(), tiny_info())
    assert again.read_bytes() == model_file.read_bytes()  # no time stamp: same weights, same SHA256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.safetensors", "tiny.safetensors"]


def test_a_failed_save_leaves_the_old_file_and_no_temporary(model_file, monkeypatch):
    before = model_file.read_bytes()

    def fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(OSError, match="No space"):
        save_model(model_file, trained_tiny(), tiny_info())
    assert model_file.read_bytes() == before and [p.name for p in model_file.parent.iterdir()] == ["tiny.safetensors"]


@pytest.mark.parametrize("info, message", [
    (dict(config={"channels": 2, "hidden": 5}), r"wrong shape: first.bias \[3\] instead of \[5\]"),
    (dict(kind="no-such-kind"), "unknown model kind 'no-such-kind'"),
    (dict(config={"channels": 2, "depth": 3}), "rejects the configuration"),
], ids=["config differs from the network", "unknown kind", "config refused"])
def test_save_refuses_a_network_its_info_cannot_rebuild(tmp_path, info, message):
    with pytest.raises(CT2XInputError, match=message):
        save_model(tmp_path / "x.safetensors", trained_tiny(), tiny_info(**info))
    assert list(tmp_path.iterdir()) == []


def test_save_wants_the_safetensors_suffix_and_an_existing_folder(tmp_path):
    with pytest.raises(CT2XInputError, match="ends in .safetensors"):
        save_model(tmp_path / "x.pth", trained_tiny(), tiny_info())
    with pytest.raises(CT2XInputError, match="does not exist"):
        save_model(tmp_path / "no" / "x.safetensors", trained_tiny(), tiny_info())


def test_model_info_json_round_trip_and_validation():
    info = tiny_info(created_by="ct2x 9")
    assert ModelInfo.from_json(info.to_json()) == info
    assert json.loads(info.to_json())["format_version"] == FORMAT_VERSION
    with pytest.raises(CT2XInputError, match="'license' must be a non-empty string"):
        tiny_info(license="")
    with pytest.raises(CT2XInputError, match="metric 'psnr_db'"):
        tiny_info(metrics={"psnr_db": {"value": 26.5}})
    with pytest.raises(CT2XInputError, match="metric 'ssim'"):
        tiny_info(metrics={"ssim": {"value": float("nan"), "convention": "3-D"}})
    with pytest.raises(CT2XInputError, match="not JSON"):
        tiny_info(config={"channels": {1, 2}})
    with pytest.raises(NewerFormatError, match="update ct2x"):
        tiny_info(format_version=FORMAT_VERSION + 1)


def metadata_with(**changes) -> dict:
    data = json.loads(tiny_info(created_by="ct2x 0").to_json())
    data.update(changes)
    return {METADATA_KEY: json.dumps({k: v for k, v in data.items() if v is not None})}


BROKEN_FILES = {
    "missing": (None, "no such model file"),
    "empty": (lambda p: p.write_bytes(b""), "not a readable safetensors file"),
    "text": (lambda p: p.write_text("hello, I am not a model"), "not a readable safetensors file"),
    "truncated": (lambda p: p.write_bytes(raw_file(p, tiny_tensors(), metadata_with()).read_bytes()[:-7]),
                  "not a readable safetensors file.*damaged, truncated"),
    "pickle": (lambda p: torch.save(tiny_tensors(), p), "not a readable safetensors file"),
    "no metadata": (lambda p: raw_file(p, tiny_tensors()), "without CT2X metadata"),
    "metadata not JSON": (lambda p: raw_file(p, tiny_tensors(), {METADATA_KEY: "{kind:"}),
                          "malformed CT2X metadata: not JSON"),
    "field missing": (lambda p: raw_file(p, tiny_tensors(), metadata_with(license=None)),
                      "malformed CT2X metadata: missing field 'license'"),
    "unknown field": (lambda p: raw_file(p, tiny_tensors(), metadata_with(licence="MIT")),
                      "malformed CT2X metadata: unknown field 'licence'"),
    "config not an object": (lambda p: raw_file(p, tiny_tensors(), metadata_with(config=[2, 3])),
                             "'config' must be a JSON object"),
    "newer format": (lambda p: raw_file(p, tiny_tensors(), metadata_with(format_version=FORMAT_VERSION + 1,
                                                                         new_field=1)),
                     "newer ct2x.*update ct2x"),
    "unknown kind": (lambda p: raw_file(p, tiny_tensors(), metadata_with(kind="x2ct-nonesuch")),
                     "unknown model kind 'x2ct-nonesuch'.*update ct2x"),
    "config refused": (lambda p: raw_file(p, tiny_tensors(), metadata_with(config={"channels": 2, "hidden": 0})),
                       "rejects the configuration.*hidden must be at least 1"),
    "tensor missing": (lambda p: raw_file(p, {k: v for k, v in tiny_tensors().items() if k != "norm.weight"},
                                          metadata_with()), r"1 missing \(norm.weight\)"),
    "tensor unexpected": (lambda p: raw_file(p, {**tiny_tensors(), "extra.weight": torch.zeros(2)}, metadata_with()),
                          r"1 unexpected \(extra.weight\)"),
    "tensor wrong shape": (lambda p: raw_file(p, {**tiny_tensors(), "second.bias": torch.zeros(2)}, metadata_with()),
                           r"wrong shape: second.bias \[2\] instead of \[1\]"),
    "tensor not finite": (lambda p: raw_file(p, {**tiny_tensors(), "first.bias": torch.tensor([0, float("nan"), 0])},
                                             metadata_with()), "'first.bias' holds NaN or infinite values"),
}


@pytest.mark.parametrize("make, message", BROKEN_FILES.values(), ids=BROKEN_FILES.keys())
def test_a_broken_model_file_is_refused_naming_the_file_the_problem_and_what_to_do(tmp_path, make, message):
    path = tmp_path / "broken.safetensors"
    if make is not None:
        make(path)
    with pytest.raises(CT2XInputError, match=message) as refused:
        load(path)
    assert str(refused.value).startswith(f"{path}: ")
    assert any(hint in str(refused.value) for hint in ("again", "update ct2x", "import", "no such"))


def test_large_finite_weights_whose_sum_overflows_are_not_mistaken_for_infinite(tmp_path):
    huge = {**tiny_tensors(), "first.bias": torch.tensor([3e38, 3e38, 0.0])}  # float32 sum: inf
    network, _ = load(raw_file(tmp_path / "huge.safetensors", huge, metadata_with()))
    assert network.first.bias[0] == 3e38


def test_load_refuses_a_folder_and_an_unknown_device(tmp_path, model_file):
    with pytest.raises(CT2XInputError, match="is a folder"):
        load(tmp_path)
    with pytest.raises(CT2XInputError, match="not a device"):
        load(model_file, device="gpu0")


def test_architectures_by_name_are_imported_when_first_built(monkeypatch):
    register_architecture("test-conv", "torch.nn:Conv2d")
    network = build_network("test-conv", {"in_channels": 1, "out_channels": 2, "kernel_size": 3})
    assert isinstance(network, torch.nn.Conv2d) and network.out_channels == 2
    register_architecture(KIND, TinyNet)  # the same again: fine
    with pytest.raises(ValueError, match="already registered"):
        register_architecture(KIND, "torch.nn:Linear")
    with pytest.raises(CT2XInputError, match=r"unknown model kind 'x2ct-nonesuch' \(this ct2x builds: .*test-conv, "
                                             "test-tiny"):
        build_network("x2ct-nonesuch", {})


def test_importing_the_models_package_and_command_imports_neither_torch_nor_safetensors():
    code = ("import sys, ct2x.models, ct2x.cli.models; "
            "print(sorted({'torch', 'safetensors'} & {name.split('.')[0] for name in sys.modules}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_cli_info_prints_the_metadata_readably(model_file, capsys):
    assert main(["models", "info", str(model_file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(model_file)
    for line in ("  kind             test-tiny", "  licence          Apache-2.0",
                 f"  created by       ct2x {__version__} (model file format {FORMAT_VERSION})",
                 "  tensors          9 holding 98 values (F32, I64)", "  configuration", "    hidden         3",
                 '    views          ["PA", "lateral"]', "  metrics", "    psnr_db", "      convention   peak 2500 HU",
                 "      value        26.5"):
        assert line in lines, line


def test_cli_info_on_a_broken_file_exits_2_naming_it(tmp_path, capsys):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00" * 64)
    assert main(["models", "info", str(path)]) == 2
    assert f"ct2x models: error: {path}: not a readable safetensors file" in capsys.readouterr().err
