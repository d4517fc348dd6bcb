"""The model registry, the model cache and downloads; a local HTTP server on 127.0.0.1 and file:// URLs stand in for
the web."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ct2x.cli.main import main
from ct2x.errors import CT2XInputError, CT2XWarning
from ct2x.models import (
    DownloadError,
    ManualDownload,
    ModelInfo,
    RegistryEntry,
    architectures,
    cache_path,
    cache_root,
    cache_state,
    cached_path,
    download,
    find_model,
    load_registry,
    register_architecture,
    registry,
    save_model,
)
from ct2x.models import cache as cache_module

MODEL_BYTES = bytes(range(256)) * 400  # 102,400 bytes standing in for a model file (only its SHA256 matters here)
SERVER_TIMEOUT_S = 10.0


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def downloadable(url: str, data: bytes = MODEL_BYTES, **changes) -> RegistryEntry:
    fields = dict(name="tiny", kind="test-conv", description="a test model", license="Apache-2.0", url=url,
                  sha256=sha256(data), size_bytes=len(data))
    fields.update(changes)
    return RegistryEntry(**fields)


MANUAL = ManualDownload(page="https://example.org/weights", instructions="Fetch conv.pth there.",
                        import_command="ct2x models import conv conv.pth --out {path}")


def by_hand(**changes) -> RegistryEntry:
    fields = dict(name="by-hand", kind="test-conv", description="weights fetched by hand", license="GPL-3.0",
                  manual=MANUAL)
    fields.update(changes)
    return RegistryEntry(**fields)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """The models folder of a fresh cache (CT2X_CACHE_DIR); loopback never goes through a proxy."""
    monkeypatch.setenv("CT2X_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    return tmp_path / "cache" / "models"


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1 serving MODEL_BYTES at /tiny.safetensors and, at /cut.safetensors, half of them
    before hanging up; `requests` lists the paths asked for."""
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if self.path not in ("/tiny.safetensors", "/cut.safetensors"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(MODEL_BYTES)))
            self.end_headers()
            self.wfile.write(MODEL_BYTES if self.path == "/tiny.safetensors" else MODEL_BYTES[:len(MODEL_BYTES) // 2])

        def log_message(self, *args):
            pass

    Handler.timeout = SERVER_TIMEOUT_S
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_port}", requests=requests)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(SERVER_TIMEOUT_S)


@pytest.fixture
def conv_architecture(monkeypatch):
    monkeypatch.setattr(architectures, "ARCHITECTURES", dict(architectures.ARCHITECTURES))
    register_architecture("test-conv", "torch.nn:Conv2d")
    register_architecture("test-linear", "torch.nn:Linear")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def files_in(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def write_registry(path: Path, *entries: dict) -> Path:
    path.write_text(json.dumps({"format_version": 1, "models": list(entries)}), encoding="utf-8")
    return path


def as_json(entry: RegistryEntry) -> dict:
    fields = {k: v for k, v in vars(entry).items() if v is not None}
    if entry.manual is not None:
        fields["manual"] = vars(entry.manual)
    return fields


def test_the_shipped_registry_lists_the_official_x2ct_weights_for_import_by_hand():
    entries = load_registry()
    assert {entry.kind for entry in entries.values()} >= {"x2ct-biplanar", "x2ct-single"}
    for entry in entries.values():
        if entry.kind.startswith("x2ct-"):
            assert entry.url is None and entry.license == "GPL-3.0"
            assert entry.manual.page == "https://github.com/kylekma/X2CT"
            variant = entry.kind[len("x2ct-"):]
            assert entry.manual.command_for(Path("/c/m.safetensors")).startswith("ct2x models import x2ct ")
            assert entry.manual.command_for(Path("/c/m.safetensors")).endswith(f"--variant {variant} --out "
                                                                                "/c/m.safetensors")
    if sys.platform != "win32":
        assert MANUAL.command_for(Path("/my cache/m.safetensors")).endswith("--out '/my cache/m.safetensors'")


def test_download_verifies_caches_and_never_downloads_twice(server, cache, monkeypatch):
    entry = downloadable(f"{server.url}/tiny.safetensors")
    assert cache_state(entry) == "absent"

    path = download(entry, progress=False)

    assert path == cache / "tiny.safetensors" == cache_path(entry) and path.read_bytes() == MODEL_BYTES
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert files_in(cache) == ["tiny.safetensors", "tiny.safetensors.verified.json"]
    assert cache_state(entry) == "verified" and server.requests == ["/tiny.safetensors"]
    monkeypatch.setattr(cache_module, "_sha256_of", lambda path: pytest.fail("hashed a verified file again"))
    assert download(entry, progress=False) == path == cached_path(entry)
    assert server.requests == ["/tiny.safetensors"]  # one request in all


class StopDownload(Exception):
    """Raised by a progress callback, as a Cancel button does."""


def test_download_reports_its_fraction_and_a_stopped_download_leaves_nothing(server, cache, monkeypatch):
    monkeypatch.setattr(cache_module, "CHUNK_BYTES", 16384)  # 7 pieces of the 102,400 bytes
    entry = downloadable(f"{server.url}/tiny.safetensors")
    fractions = []
    download(entry, progress=fractions.append)
    assert len(fractions) >= 2 and fractions == sorted(fractions) and fractions[-1] == 1.0

    def stop(fraction: float) -> None:
        raise StopDownload()

    other = downloadable(f"{server.url}/tiny.safetensors", name="other")
    with pytest.raises(StopDownload):
        download(other, progress=stop)
    assert cache_state(other) == "absent" and "other.safetensors" not in files_in(cache)


def test_file_urls_download_too(tmp_path, cache):
    source = tmp_path / "published.safetensors"
    source.write_bytes(MODEL_BYTES)
    assert download(downloadable(source.as_uri()), progress=False).read_bytes() == MODEL_BYTES


@pytest.mark.parametrize("path, changes, message", [
    ("/tiny.safetensors", dict(sha256=sha256(b"other")), "the download's SHA256 is [0-9a-f]{64}, not .*deleted it"),
    ("/tiny.safetensors", dict(size_bytes=len(MODEL_BYTES) - 1), "larger than the 102399 bytes .*deleted the"),
    ("/cut.safetensors", {}, r"could not download tiny from .*/cut.safetensors \(the connection ended after 51200 "
                             r"of 102400 bytes; try again\)"),
    ("/gone.safetensors", {}, r"could not download tiny from .* \(HTTP 404 Not Found\)"),
], ids=["wrong SHA256", "too long", "cut short", "not found"])
def test_a_failed_download_leaves_nothing(server, cache, path, changes, message):
    entry = downloadable(f"{server.url}{path}", **changes)
    with pytest.raises(DownloadError, match=message):
        download(entry, progress=False)
    assert files_in(cache) == [] and cache_state(entry) == "absent"


def test_offline_the_message_says_which_file_to_fetch_and_exactly_where_to_put_it(cache):
    url = f"http://127.0.0.1:{closed_port()}/tiny.safetensors"
    with pytest.raises(DownloadError) as failed:
        download(downloadable(url), progress=False)
    message = str(failed.value)
    assert f"could not download tiny from {url} (" in message
    assert f"put it at {cache / 'tiny.safetensors'};" in message and sha256(MODEL_BYTES) in message
    assert files_in(cache) == []


def test_a_file_put_in_the_cache_by_hand_is_hashed_once_and_deleted_when_wrong(cache, monkeypatch):
    entry = downloadable("https://example.org/tiny.safetensors")
    cache.mkdir(parents=True)
    (cache / "tiny.safetensors").write_bytes(MODEL_BYTES)
    assert cache_state(entry) == "unverified"

    assert cached_path(entry) == cache / "tiny.safetensors" and cache_state(entry) == "verified"

    with open(cache / "tiny.safetensors", "ab") as file:  # changed since: size and time differ from the record
        file.write(b"!")
    assert cache_state(entry) == "unverified"
    with pytest.warns(CT2XWarning, match="its SHA256 is .* deleted it"), \
            pytest.raises(CT2XInputError, match="`ct2x models download tiny` fetches it"):
        cached_path(entry)
    assert files_in(cache) == []


def test_cache_location_per_platform_and_its_override(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CT2X_CACHE_DIR", "here")
    assert cache_root() == tmp_path / "here"
    monkeypatch.delenv("CT2X_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert cache_root() == tmp_path / "home" / ".cache" / "ct2x"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "ct2x"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert cache_root() == tmp_path / "home" / "Library" / "Caches" / "ct2x"
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert cache_root() == tmp_path / "local" / "ct2x" / "Cache"


def test_weights_fetched_by_hand_come_with_instructions_and_must_be_of_the_entry_kind(cache, conv_architecture):
    entry = by_hand()
    with pytest.raises(CT2XInputError) as absent:
        download(entry)
    path = cache / "by-hand.safetensors"
    assert str(absent.value) == (
        f"by-hand is not in the cache ({path}), and its weights (GPL-3.0) cannot be downloaded automatically:\n"
        "  1. Fetch conv.pth there. Page: https://example.org/weights\n"
        f"  2. Turn them into a CT2X model file: ct2x models import conv conv.pth --out {path}")
    assert cache.is_dir()  # the folder the message names exists

    linear = ModelInfo(kind="test-linear", config={"in_features": 2, "out_features": 1}, license="GPL-3.0")
    save_model(path, torch.nn.Linear(2, 1), linear)
    with pytest.raises(CT2XInputError, match="holds a test-linear model, not test-conv; import the right weights"):
        cached_path(entry)

    conv = ModelInfo(kind="test-conv", config={"in_channels": 1, "out_channels": 1, "kernel_size": 1},
                     license="GPL-3.0")
    save_model(path, torch.nn.Conv2d(1, 1, 1), conv)
    assert cache_state(entry) == "imported" and cached_path(entry) == download(entry) == path


BAD_ENTRIES = {
    "unknown field": ({"licence": "MIT"}, "unknown field 'licence'"),
    "empty kind": ({"kind": ""}, "'kind' must be a non-empty string"),
    "name with a slash": ({"name": "a/b"}, "'name' may hold only"),
    "ftp": ({"url": "ftp://example.org/m"}, "'url' must start with https://"),
    "short sha256": ({"sha256": "abc"}, "'sha256' must be 64 lowercase hex digits"),
    "size zero": ({"size_bytes": 0}, "'size_bytes' must be a positive integer"),
    "manual and url": ({"manual": vars(MANUAL)}, "give either 'manual' or 'url'"),
}


@pytest.mark.parametrize("changes, message", BAD_ENTRIES.values(), ids=BAD_ENTRIES.keys())
def test_a_malformed_registry_entry_is_named(tmp_path, changes, message):
    bad = {**as_json(downloadable("https://example.org/m.safetensors")), **changes}
    path = write_registry(tmp_path / "registry.json", as_json(by_hand()), bad)
    with pytest.raises(CT2XInputError, match=f"{path}: model 1 \\('.*'\\): {message}"):
        load_registry(path)


def test_registry_files_are_checked_as_a_whole(tmp_path):
    path = tmp_path / "registry.json"
    path.write_text("{", encoding="utf-8")
    with pytest.raises(CT2XInputError, match="not JSON"):
        load_registry(path)
    path.write_text(json.dumps({"format_version": 2, "models": []}), encoding="utf-8")
    with pytest.raises(CT2XInputError, match='"format_version": 1'):
        load_registry(path)
    write_registry(path, as_json(by_hand()), as_json(by_hand()))
    with pytest.raises(CT2XInputError, match="'by-hand' appears twice"):
        load_registry(path)
    no_path = {**as_json(by_hand()), "manual": {**vars(MANUAL), "import_command": "ct2x models import conv x"}}
    write_registry(path, no_path)
    with pytest.raises(CT2XInputError, match="must write to {path}"):
        load_registry(path)
    write_registry(path, as_json(by_hand()))
    with pytest.raises(CT2XInputError, match="no model called 'tiny'; known models: by-hand"):
        find_model("tiny", path)


@pytest.fixture
def test_registry(tmp_path, monkeypatch, server, cache) -> Path:
    """The command line's registry: `tiny` on the test server, `offline` behind a closed port, `by-hand`."""
    path = write_registry(tmp_path / "registry.json", as_json(downloadable(f"{server.url}/tiny.safetensors")),
                          as_json(downloadable(f"http://127.0.0.1:{closed_port()}/m.safetensors", name="offline")),
                          as_json(by_hand()))
    monkeypatch.setattr(registry, "REGISTRY_PATH", path)
    return path


def test_cli_download_path_and_list(test_registry, server, cache, capsys):
    assert main(["models", "path", "tiny"]) == 2
    assert "`ct2x models download tiny` fetches it (102.4 kB from http://127.0.0.1:" in capsys.readouterr().err

    assert main(["models", "download", "tiny", "--quiet"]) == 0
    assert capsys.readouterr().out == (f"ct2x models download: tiny downloaded (102.4 kB), SHA256 verified: "
                                       f"{cache / 'tiny.safetensors'}\n")
    assert main(["models", "download", "tiny"]) == 0
    assert "tiny was already in the cache" in capsys.readouterr().out and len(server.requests) == 1
    assert main(["models", "path", "tiny"]) == 0
    assert capsys.readouterr().out == f"{cache / 'tiny.safetensors'}\n"

    assert main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "SIZE", "LICENCE", "CACHED", "DESCRIPTION"]
    assert lines[1].split()[:6] == ["tiny", "test-conv", "102.4", "kB", "Apache-2.0", "yes"]
    assert lines[2].split()[:6] == ["offline", "test-conv", "102.4", "kB", "Apache-2.0", "no"]
    assert lines[3].split()[:7] == ["by-hand", "test-conv", "-", "GPL-3.0", "no,", "by", "hand"]
    assert f"cache: {cache} ($CT2X_CACHE_DIR moves it)" in lines


def test_cli_download_failures_exit_1_and_input_errors_exit_2(test_registry, cache, capsys):
    assert main(["models", "download", "offline", "--quiet"]) == 1
    assert f"put it at {cache / 'offline.safetensors'}" in capsys.readouterr().err
    assert main(["models", "download", "by-hand"]) == 2
    assert "cannot be downloaded automatically" in capsys.readouterr().err
    assert main(["models", "path", "nonesuch"]) == 2
    assert "no model called 'nonesuch'; known models: tiny, offline, by-hand" in capsys.readouterr().err
