"""ct2x.output_folder: output never lost, mixed or half-written; racing, killed and stopped runs of `ct2x drr`.

Unit tests use tmp_path and monkeypatched errors (tests run as root, so chmod blocks nothing); real-process tests run
`python -m ct2x.cli.main drr` on a 32^3 CT; mount tests need root and tmpfs and are skipped elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List

import pytest

import ct2x.cli.drr
import ct2x.output_folder
from ct2x.cli.main import main
from ct2x.errors import CT2XInputError, CT2XWarning
from ct2x.io import save_ct
from ct2x.output_folder import MARKER, STAGING, OutputFolder, OutputFolderError, is_ct2x_output
from ct2x.phantoms import chest

DRR = [sys.executable, "-m", "ct2x.cli.main", "drr"]
FAST = ["--size", "32", "--spacing", "10", "--quiet"]
TIMEOUT_S = 120
TMPFS = ("-t", "tmpfs", "-o", "size=1m", "tmpfs")


@pytest.fixture
def ct_file(tmp_path) -> Path:
    return save_ct(chest(size=32, spacing_mm=10), tmp_path / "chest.mha")


def listing(folder: Path) -> dict:
    """{relative path: bytes, or None for a folder} of everything under `folder`."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def staging_folders(out: Path) -> List[Path]:
    return [p for p in (out.with_name(out.name + STAGING), out / STAGING) if os.path.lexists(p)]


def ct2x_output(folder: Path, text: str = "old") -> dict:
    """A finished ct2x output (marker and one file) in `folder`; returns its listing."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(json.dumps({"created_by": "ct2x 0.1.0"}))
    (folder / "result.txt").write_text(text)
    return listing(folder)


def write_new(staging: Path) -> None:
    (staging / "a.txt").write_text("new a")
    (staging / "b.txt").write_text("new b")


def fail_mkdir(monkeypatch, error_number: int, *paths: Path) -> None:
    """Make creating any of `paths` fail with `error_number`, as on a read-only or foreign parent."""
    mkdir = os.mkdir

    def refusing_mkdir(path, *args, **kwargs):
        if Path(path) in paths:
            raise OSError(error_number, os.strerror(error_number), str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refusing_mkdir)


# --- publishing, failures, modes -------------------------------------------------------------------------------------

def test_publishes_the_whole_folder_marked_with_ordinary_modes(tmp_path):
    out = tmp_path / "out"
    umask = os.umask(0o027)
    try:
        with OutputFolder(out, command="ct2x test") as staging:
            assert staging.parent == out.with_name("out" + STAGING) and not out.exists()
            os.close(os.open(staging / "private.mha", os.O_CREAT | os.O_WRONLY, 0o600))  # as mkstemp makes them
            (staging / "sub").mkdir(mode=0o700)
            (staging / "sub" / "x.txt").write_text("x")
    finally:
        os.umask(umask)
    assert set(listing(out)) == {"private.mha", "sub", "sub/x.txt", MARKER}
    assert [p.stat().st_mode & 0o777 for p in (out / "private.mha", out / "sub" / "x.txt")] == [0o640, 0o640]
    assert [p.stat().st_mode & 0o777 for p in (out, out / "sub")] == [0o750, 0o750]
    marker = json.loads((out / MARKER).read_text())
    assert marker["created_by"] == f"ct2x {ct2x.__version__}" and marker["command"] == "ct2x test"
    assert is_ct2x_output(out) and not staging_folders(out)


def test_own_ct2x_sidecar_needs_no_marker(tmp_path):
    with OutputFolder(tmp_path / "out") as staging:
        (staging / "series.json").write_text(json.dumps({"created_by": "ct2x 0.1.0 drr"}))
    assert set(listing(tmp_path / "out")) == {"series.json"} and is_ct2x_output(tmp_path / "out")


@pytest.mark.parametrize("failure", [RuntimeError("GPU fell over"), KeyboardInterrupt(), SystemExit(143)])
def test_failure_leaves_the_folder_as_it_was(tmp_path, failure):
    out = tmp_path / "out"
    before = ct2x_output(out)
    with pytest.raises(type(failure)):
        with OutputFolder(out, overwrite=True) as staging:
            write_new(staging)
            raise failure
    assert listing(out) == before and not staging_folders(out)
    with pytest.raises(RuntimeError):
        with OutputFolder(tmp_path / "fresh") as staging:
            write_new(staging)
            raise RuntimeError("failed")
    assert list(tmp_path.iterdir()) == [out]


def test_disk_full_while_writing_says_what_the_staging_folder_is(tmp_path):
    out = tmp_path / "out"
    before = ct2x_output(out)
    with pytest.raises(OutputFolderError) as caught:
        with OutputFolder(out, overwrite=True, name="--out out") as staging:
            raise OSError(errno.ENOSPC, "No space left on device", str(staging / "view.mha"))
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC and message.startswith("--out out: writing the output failed")
    assert f"{out.with_name('out' + STAGING)} is the staging folder" in message and "the folder is as it was" in message
    assert listing(out) == before and not staging_folders(out)


def test_disk_full_while_publishing_puts_the_folder_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    before = ct2x_output(out)
    rename = os.rename

    def rename_then_full(source, target):
        if Path(source).name == "new":
            raise OSError(errno.ENOSPC, "No space left on device", str(source))
        rename(source, target)

    with pytest.raises(OutputFolderError) as caught:
        with OutputFolder(out, overwrite=True) as staging:
            write_new(staging)
            monkeypatch.setattr(os, "rename", rename_then_full)
    assert str(caught.value).startswith(f"{out}: moving the finished output into place failed")
    assert f"{out.with_name('out' + STAGING)} is the staging folder" in str(caught.value)
    assert listing(out) == before and not staging_folders(out)


# --- who may replace what --------------------------------------------------------------------------------------------

def test_second_run_is_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    first = OutputFolder(out)
    staging = first.claim()
    second = OutputFolder(out, name="--out out")
    busy = rf"--out out: another ct2x run \(pid {os.getpid()}, started \d\d:\d\d:\d\d, .*\) is writing this folder; " \
           "wait for it or choose another folder"
    with pytest.raises(CT2XInputError, match=busy):
        second.check()
    with pytest.raises(CT2XInputError, match=busy):
        second.claim()
    write_new(staging)
    first.publish()
    assert set(listing(out)) == {"a.txt", "b.txt", MARKER}
    with pytest.raises(CT2XInputError, match="holds an earlier ct2x output; pass --overwrite"):
        second.check()


def test_final_move_checks_again_and_replaces_nothing_it_may_not(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CT2XInputError, match="not written by ct2x"):
        with OutputFolder(out) as staging:
            write_new(staging)
            out.mkdir()
            (out / "notes.txt").write_text("someone else's")
    assert listing(out) == {"notes.txt": b"someone else's"} and not staging_folders(out)


def test_overwrite_refuses_a_folder_ct2x_did_not_write(tmp_path):
    out = tmp_path / "study"
    out.mkdir()
    for i in range(1, 5):
        (out / f"IM{i:04d}.dcm").write_bytes(b"\0" * 1000)
    before = listing(out)
    with pytest.raises(CT2XInputError) as caught:
        OutputFolder(out, overwrite=True, name="--out study").check()
    assert str(caught.value) == ("--out study: holds 4 files (4.0 kB), e.g. IM0001.dcm, IM0002.dcm, IM0003.dcm, ..., "
                                 "not written by ct2x; ct2x replaces only folders it wrote: delete it yourself or "
                                 "choose another folder")
    with pytest.raises(CT2XInputError, match="not empty and was not written by ct2x: holds 4 files"):
        OutputFolder(out).check()
    assert listing(out) == before and not staging_folders(out)


@pytest.mark.parametrize("created_by, replaced", [("ct2x 0.0.1 drr", True), ("another tool", False)])
def test_overwrite_takes_series_json_of_earlier_versions(tmp_path, created_by, replaced):
    out = tmp_path / "out"
    out.mkdir()
    (out / "series.json").write_text(json.dumps({"created_by": created_by}))
    with contextlib.ExitStack() as stack:
        if not replaced:
            stack.enter_context(pytest.raises(CT2XInputError, match="not written by ct2x"))
        with OutputFolder(out, overwrite=True) as staging:
            write_new(staging)
    assert set(listing(out)) == ({"a.txt", "b.txt", MARKER} if replaced else {"series.json"})


def test_overwrite_never_deletes_what_must_be_kept(tmp_path, monkeypatch):
    out = tmp_path / "out"
    before = ct2x_output(out)
    with pytest.raises(CT2XInputError, match=f"replacing it would delete {out / 'result.txt'}"):
        OutputFolder(out, overwrite=True, keep=[out / "result.txt"]).check()
    assert listing(out) == before
    here = tmp_path / "here"  # the working directory as the output folder: filled in place, never renamed
    here.mkdir()
    monkeypatch.chdir(here)
    inode = here.stat().st_ino
    with OutputFolder(".", keep=[Path.cwd()]) as staging:
        assert staging.parent == here / STAGING
        write_new(staging)
    assert here.stat().st_ino == inode and set(listing(here)) == {"a.txt", "b.txt", MARKER}


# --- where to stage --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("error_number", [errno.EROFS, errno.EACCES, errno.EPERM])
def test_unwritable_parent_stages_inside_the_folder(tmp_path, monkeypatch, error_number):
    out = tmp_path / "volume"
    ct2x_output(out)
    (out / "old-only.txt").write_text("old")
    inode = out.stat().st_ino
    fail_mkdir(monkeypatch, error_number, out.with_name(out.name + STAGING))
    with OutputFolder(out, overwrite=True) as staging:
        assert staging.parent == out / STAGING
        write_new(staging)
    assert out.stat().st_ino == inode and set(listing(out)) == {"a.txt", "b.txt", MARKER}
    assert not staging_folders(out)


def test_unwritable_parent_and_no_folder_fails_before_any_work(tmp_path, monkeypatch):
    out = tmp_path / "volume"
    fail_mkdir(monkeypatch, errno.EROFS, out.with_name(out.name + STAGING))
    with pytest.raises(OutputFolderError) as caught:
        OutputFolder(out, name="--out volume").check()
    assert str(caught.value) == f"--out volume: cannot create the folder in {tmp_path}: Read-only file system"
    assert caught.value.errno == errno.EROFS and not out.exists()


def test_nothing_writable_fails_before_any_work(tmp_path, monkeypatch):
    out = tmp_path / "volume"
    out.mkdir()
    fail_mkdir(monkeypatch, errno.EROFS, out.with_name(out.name + STAGING), out / STAGING)
    with pytest.raises(OutputFolderError, match="^--out volume: cannot write into the folder: Read-only file system$"):
        OutputFolder(out, name="--out volume").check()


def test_mount_point_stages_inside_and_is_never_renamed(tmp_path, monkeypatch):
    out = tmp_path / "mount"
    ct2x_output(out)
    (out / "lost+found").mkdir()  # a filesystem's own: neither content nor replaced
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == out)
    rename = os.rename

    def rename_but_not_the_mount_point(source, target):
        if Path(source) == out:
            raise OSError(errno.EBUSY, "Device or resource busy", str(source))
        rename(source, target)

    monkeypatch.setattr(os, "rename", rename_but_not_the_mount_point)
    with OutputFolder(out, overwrite=True) as staging:
        assert staging.parent == out / STAGING
        write_new(staging)
    assert set(listing(out)) == {"a.txt", "b.txt", MARKER, "lost+found"}


# --- leftovers of stopped runs ---------------------------------------------------------------------------------------

CRASHING_RUN = """
import os, sys
from pathlib import Path
import ct2x.output_folder as output_folder
out, inside, die_after_renames = Path(sys.argv[1]), sys.argv[2] == "inside", int(sys.argv[3])
if inside:
    output_folder._is_mount_point = lambda path: Path(path) == out
with output_folder.OutputFolder(out, overwrite=True) as staging:
    for name in ("a.txt", "b.txt"):
        (staging / name).write_text("new " + name)
    if die_after_renames < 0:
        os._exit(9)
    rename, renames = os.rename, []
    def rename_then_die(source, target):
        rename(source, target)
        renames.append(target)
        if len(renames) == die_after_renames:
            os._exit(9)
    os.rename = rename_then_die
"""


@pytest.mark.parametrize("inside, die_after_renames, outcome", [
    (False, -1, "stopped before it finished; the folder is as it was"),
    (False, 1, "stopped while moving its output into place; put the folder back"),  # old aside, new not yet in
    (False, 2, "stopped just after it finished; the folder holds that run's output"),
    (True, -1, "stopped before it finished"),
    (True, 1, "stopped while moving its output into place"),  # one of two old files moved aside
    (True, 5, "stopped while moving its output into place"),  # old aside, one new file moved in
])
def test_next_run_undoes_a_killed_run(tmp_path, inside, die_after_renames, outcome):
    out = tmp_path / "out"
    before = ct2x_output(out)
    crashed = subprocess.run([sys.executable, "-c", CRASHING_RUN, str(out), "inside" if inside else "next to",
                              str(die_after_renames)], timeout=TIMEOUT_S)
    assert crashed.returncode == 9 and staging_folders(out)
    if (inside, die_after_renames) == (False, 1):
        assert not out.exists()  # the moment the next run must repair
    with pytest.warns(CT2XWarning, match=outcome):
        OutputFolder(out, overwrite=True).check()
    if die_after_renames == 2:
        assert set(listing(out)) == {"a.txt", "b.txt", MARKER} and (out / "a.txt").read_text() == "new a.txt"
    else:
        assert listing(out) == before
    assert not staging_folders(out)


def test_leftover_that_cannot_be_undone_is_explained(tmp_path):
    out = tmp_path / "out"
    ct2x_output(out)
    subprocess.run([sys.executable, "-c", CRASHING_RUN, str(out), "next to", "1"], timeout=TIMEOUT_S)
    out.mkdir()  # made again, by hand, before the next run
    (out / "notes.txt").write_text("mine")
    failed = rf"putting the folder back failed: .* Its staging folder {out}{STAGING} holds the earlier files"
    with pytest.raises(OutputFolderError, match=failed):
        OutputFolder(out, overwrite=True).check()
    assert (out.with_name("out" + STAGING) / "previous" / "result.txt").read_text() == "old"


def test_next_run_keeps_a_new_folder_published_just_before_the_kill(tmp_path):
    out = tmp_path / "out"
    crashed = subprocess.run([sys.executable, "-c", CRASHING_RUN, str(out), "next to", "1"], timeout=TIMEOUT_S)
    assert crashed.returncode == 9 and staging_folders(out)
    with pytest.warns(CT2XWarning, match="stopped just after it finished; the folder holds that run's output"):
        OutputFolder(out, overwrite=True).check()
    assert set(listing(out)) == {"a.txt", "b.txt", MARKER} and not staging_folders(out)


def test_without_file_locks_a_leftover_counts_as_busy(tmp_path, monkeypatch):
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-c", CRASHING_RUN, str(out), "next to", "-1"], timeout=TIMEOUT_S)
    monkeypatch.setattr(ct2x.output_folder, "fcntl", None)  # as on Windows: a dead owner cannot be told
    with pytest.raises(CT2XInputError, match=rf"is writing this folder; .* delete its staging folder {out}{STAGING}"):
        OutputFolder(out).check()


def test_staging_folder_without_owner_record(tmp_path):
    out = tmp_path / "out"
    staging = out.with_name("out" + STAGING)
    staging.mkdir()  # a run between its mkdir and its owner record, or killed there
    with pytest.raises(CT2XInputError, match="another ct2x run is starting to write this folder"):
        OutputFolder(out).check()
    old = time.time() - 60
    os.utime(staging, (old, old))
    with pytest.warns(CT2XWarning, match="stopped before it finished"):
        OutputFolder(out).check()
    assert not staging_folders(out)


# --- signals ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, status", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_main_turns_stop_signals_into_an_interruption(tmp_path, monkeypatch, capsys, name, status):
    if not hasattr(signal, name):
        pytest.skip(f"no {name} here")
    number = getattr(signal, name)
    handler = signal.getsignal(number)

    def stopped_run(args):
        os.kill(os.getpid(), number)
        time.sleep(10)  # interrupted by the handler

    monkeypatch.setattr(ct2x.cli.drr, "run", stopped_run)
    assert main(["drr", "--out", str(tmp_path / "out")]) == status
    assert capsys.readouterr().err == "ct2x drr: interrupted; nothing was written\n"
    assert signal.getsignal(number) is handler


def test_main_leaves_signal_handlers_alone_outside_the_main_thread(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(ct2x.cli.drr, "run", lambda args: seen.append(signal.getsignal(signal.SIGTERM)) or 0)
    thread = threading.Thread(target=main, args=(["drr", "--out", str(tmp_path / "out")],))
    thread.start()
    thread.join()
    assert seen == [signal.getsignal(signal.SIGTERM)]


# --- real `ct2x drr` processes ---------------------------------------------------------------------------------------

def start_drr(ct_file: Path, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(DRR + [str(ct_file), "--out", str(out), *args] + FAST, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"ct2x drr ended ({process.returncode}) before {what}: {process.communicate()[1]}")
        assert time.monotonic() < deadline, f"no {what} after {TIMEOUT_S} s"
        time.sleep(0.02)


def first_view_staged(out: Path):
    return lambda: any(out.with_name(out.name + STAGING).glob(f"{ct2x.output_folder.NEW}/*.mha"))


@pytest.mark.parametrize("name, status", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_drr_stopped_mid_series_leaves_the_folder_untouched(ct_file, tmp_path, name, status):
    if not hasattr(signal, name):
        pytest.skip(f"no {name} here")
    out = tmp_path / "drr"
    assert main(["drr", str(ct_file), "--out", str(out), "--angles", "0"] + FAST) == 0
    before = listing(out)
    process = start_drr(ct_file, out, "--angles", "0:360:1", "--overwrite")
    wait_for(first_view_staged(out), process, "the first view")
    process.send_signal(getattr(signal, name))
    _, err = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == status and "interrupted; nothing was written" in err and "Traceback" not in err
    assert listing(out) == before and not staging_folders(out)


def test_drr_killed_leaves_staging_that_the_next_run_clears(ct_file, tmp_path):
    out = tmp_path / "drr"
    process = start_drr(ct_file, out, "--angles", "0:360:1")
    wait_for(first_view_staged(out), process, "the first view")
    process.kill()
    process.communicate(timeout=TIMEOUT_S)
    assert staging_folders(out) == [out.with_name("drr" + STAGING)] and not out.exists()
    after = subprocess.run(DRR + [str(ct_file), "--out", str(out), "--angles", "0"] + FAST, capture_output=True,
                           text=True, timeout=TIMEOUT_S)
    assert after.returncode == 0, after.stderr
    assert f"removed {out}{STAGING}, the staging folder of ct2x run (pid {process.pid}" in after.stderr
    assert "stopped before it finished" in after.stderr
    assert len(json.loads((out / "series.json").read_text())["views"]) == 1 and not staging_folders(out)


GATED_DRR = """
import os, sys, time
from ct2x.drr import DRRRenderer
render_view, gate = DRRRenderer.render_view, sys.argv.pop(1)
def gated_render_view(self, view):  # says it is rendering (so it holds the folder), then waits for the gate
    open(gate + ".rendering", "w").close()
    while not os.path.exists(gate):
        time.sleep(0.02)
    return render_view(self, view)
DRRRenderer.render_view = gated_render_view
from ct2x.cli.main import main
sys.exit(main())
"""


def test_two_runs_to_one_new_folder(ct_file, tmp_path):
    out, gate = tmp_path / "drr", tmp_path / "gate"
    first = subprocess.Popen([sys.executable, "-c", GATED_DRR, str(gate), "drr", str(ct_file), "--out", str(out),
                              "--angles", "0:20:5"] + FAST, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(Path(f"{gate}.rendering").exists, first, "its rendering")
    second = subprocess.run(DRR + [str(ct_file), "--out", str(out), "--angles", "0"] + FAST, capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    gate.touch()
    _, first_err = first.communicate(timeout=TIMEOUT_S)
    assert first.returncode == 0, first_err
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert (f"ct2x drr: error: --out {out}: another ct2x run (pid {first.pid}, started " in second.stderr
            and "is writing this folder; wait for it or choose another folder" in second.stderr)
    views = json.loads((out / "series.json").read_text())["views"]
    assert [view["geometry"]["primary_angle_deg"] for view in views] == [0, 5, 10, 15, 20]
    assert all((out / name).is_file() for view in views for name in view["files"].values())


def test_drr_overwrite_replaces_only_ct2x_output(ct_file, tmp_path):
    out = tmp_path / "study"
    out.mkdir()
    for i in range(1, 4):
        (out / f"IM{i:04d}.dcm").write_bytes(b"DICM" * 100)
    before = listing(out)
    refused = subprocess.run(DRR + [str(ct_file), "--out", str(out), "--angles", "0", "--overwrite"] + FAST,
                             capture_output=True, text=True, timeout=TIMEOUT_S)
    assert refused.returncode == 2 and listing(out) == before
    assert (f"ct2x drr: error: --out {out}: holds 3 files (1.2 kB), e.g. IM0001.dcm, IM0002.dcm, IM0003.dcm, "
            "not written by ct2x; ct2x replaces only folders it wrote") in refused.stderr
    for path in out.iterdir():
        path.unlink()
    (out / "series.json").write_text(json.dumps({"created_by": "ct2x 0.0.1 drr", "views": []}))  # an earlier ct2x
    assert main(["drr", str(ct_file), "--out", str(out), "--angles", "0,90", "--overwrite"] + FAST) == 0
    assert len(json.loads((out / "series.json").read_text())["views"]) == 2 and not staging_folders(out)


CRASH_BETWEEN_RENAMES = """
import os, sys
import ct2x.output_folder
rename = os.rename
def rename_then_die(source, target):
    rename(source, target)
    if os.path.basename(target) == ct2x.output_folder.PREVIOUS:
        os._exit(9)
ct2x.output_folder.os.rename = rename_then_die
from ct2x.cli.main import main
sys.exit(main())
"""


def test_drr_killed_between_the_two_renames_is_restored(ct_file, tmp_path):
    out = tmp_path / "drr"
    assert main(["drr", str(ct_file), "--out", str(out), "--angles", "0"] + FAST) == 0
    before = listing(out)
    crashed = subprocess.run([sys.executable, "-c", CRASH_BETWEEN_RENAMES, "drr", str(ct_file), "--out", str(out),
                              "--angles", "30", "--overwrite"] + FAST, capture_output=True, timeout=TIMEOUT_S)
    assert crashed.returncode == 9 and not out.exists() and staging_folders(out)
    after = subprocess.run(DRR + [str(ct_file), "--out", str(out), "--angles", "0"] + FAST, capture_output=True,
                           text=True, timeout=TIMEOUT_S)
    assert "was stopped while moving its output into place; put the folder back as it was" in after.stderr
    assert after.returncode == 2 and "holds an earlier ct2x output; pass --overwrite" in after.stderr
    assert listing(out) == before and not staging_folders(out)


# --- real mount points and a real full disk (root with tmpfs only) ---------------------------------------------------

@contextlib.contextmanager
def mounted(target: Path, *source: str) -> Iterator[Path]:
    """`mount SOURCE... TARGET` for the block (default: a 1 MB tmpfs); skips the test where mounting is not allowed."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(["mount", *(source or TMPFS), str(target)], capture_output=True, text=True, timeout=30)
    except OSError as error:
        pytest.skip(f"cannot mount: {error}")
    if result.returncode != 0:
        pytest.skip(f"cannot mount here: {result.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], timeout=30)


def test_real_mount_point_under_a_read_only_parent(ct_file, tmp_path):
    base = tmp_path / "base"
    with mounted(base):
        volume = base / "volume"
        with mounted(volume):
            subprocess.run(["mount", "-o", "remount,ro", str(base)], check=True, timeout=30)
            with pytest.raises(OSError):
                (base / "probe").mkdir()
            assert main(["drr", str(ct_file), "--out", str(volume), "--angles", "0"] + FAST) == 0
            assert main(["drr", str(ct_file), "--out", str(volume), "--angles", "30", "--overwrite"] + FAST) == 0
            assert os.path.ismount(volume) and not staging_folders(volume)
            views = json.loads((volume / "series.json").read_text())["views"]
            assert [view["geometry"]["primary_angle_deg"] for view in views] == [30]
            assert {p.name for p in volume.iterdir()} == {"series.json", "overview.png", *views[0]["files"].values()}


def test_real_bind_mount_within_one_filesystem(tmp_path):
    source, out = tmp_path / "source", tmp_path / "out"
    source.mkdir()
    with mounted(out, "--bind", str(source)):
        ct2x_output(out)
        with OutputFolder(out, overwrite=True) as staging:
            assert staging.parent == out / STAGING  # renaming `out` would fail: EBUSY
            write_new(staging)
        assert set(listing(source)) == {"a.txt", "b.txt", MARKER}


def test_real_full_disk(ct_file, tmp_path, capsys):
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=64k", "tmpfs") as small:
        assert main(["drr", str(ct_file), "--out", str(small), "--angles", "0"] + FAST) == 0
        before = listing(small)
        capsys.readouterr()
        assert main(["drr", str(ct_file), "--out", str(small), "--angles", "0:40:1", "--overwrite"] + FAST) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"ct2x drr: error: --out {small}: writing the output failed") and "Traceback" not in err
        assert f"{small / STAGING} is the staging folder" in err and "the folder is as it was" in err
        assert listing(small) == before and not staging_folders(small)
