"""Output folders that are never lost, mixed or half-written, also when two runs race or a run is killed.

    output = OutputFolder("out/series", overwrite=False, keep=[Path.cwd()], name="--out out/series")
    output.check()                 # optional, cheap: fail before costly work such as loading a CT
    with output as staging:        # claims the folder; raises before any work when it cannot
        ...write files into staging (a Path)...
                                   # leaving the block normally publishes; an exception discards

Guarantees, for a run that writes only into `staging`:

- The folder is at any moment either as it was before the run or the run's complete output. A run that fails or is
  interrupted (any exception, Ctrl-C, SystemExit) removes its staging folder and leaves the folder as it was.
- One run at a time: the staging folder, made by one atomic mkdir and holding a locked owner record (pid, host,
  start time, command), is the lock. Another run fails before any work, naming the first.
- A run killed outright (SIGKILL, out of memory, power loss) leaves only its staging folder. The next run on the folder
  sees that its owner is gone (the record's file lock is free), puts the folder back as it was - also when the run
  was killed between moving the old output aside and the new one in - removes the staging folder and says so in a
  CT2XWarning.
- A non-empty folder is replaced only with overwrite=True, only when ct2x wrote it (`is_ct2x_output`), never when it is
  or holds one of `keep`, and the old output is deleted only after the new one is in place; these checks are made
  again right before the swap.
- Staging lies next to the folder (`DIR.partial-ct2x/`), so publishing is one rename. Where nothing can be created
  there (read-only or foreign parent, as for a container volume), or the folder is a mount point or one of `keep`,
  staging lies inside it (`DIR/.partial-ct2x/`) and the files are moved in one by one; a run killed during that move
  is undone by the next run. Where to stage, and whether the folder can be written at all, is settled by `claim`.
- The output's files and folders get the modes a plain create gives (0o666 and 0o777 less the umask); a replaced
  folder keeps its own mode.

Errors: CT2XInputError when the user must choose differently (folder not empty, not ct2x's, busy, ...);
OutputFolderError, an OSError, when the system refuses (read-only, disk full), naming any staging path as such.
Without file locks (Windows) a leftover staging folder cannot be told from a live one: the message says to delete it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import itertools
import json
import os
import re
import shlex
import shutil
import socket
import stat
import sys
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Union

from ct2x import __version__
from ct2x.errors import CT2XInputError, CT2XWarning
from ct2x.text import size_text

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

PathLike = Union[str, os.PathLike]

MARKER = ".ct2x-output.json"  # marks a finished folder that has no ct2x SIDECAR of its own
SIDECAR = "series.json"  # "created_by": "ct2x ..." marks a folder ct2x drr wrote, also before MARKER existed
STAGING = ".partial-ct2x"  # DIR.partial-ct2x next to DIR, or DIR/.partial-ct2x inside it
OWNER = "owner.json"  # in the staging folder: who staged there, file-locked while that run lives
NEW = "new"  # in the staging folder: the output being written
PREVIOUS = "previous"  # in the staging folder: the replaced output, until the new one is in place
PREVIOUS_MOVING = "previous-moving"  # staging inside DIR: the old files while they are being moved aside
UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
STARTING_SECONDS = 10.0  # a staging folder this old without an owner record belongs to a run killed while claiming
COUNT_LIMIT = 10000  # files counted when describing a foreign folder


class OutputFolderError(OSError):
    """The system refused to write an output folder; str() is the whole message, errno the cause's."""

    def __init__(self, message: str, error_number: Optional[int] = None):
        super().__init__(message)
        self.errno = error_number


def is_ct2x_output(folder: PathLike) -> bool:
    """Whether ct2x wrote `folder`: it holds MARKER, or a SIDECAR, whose "created_by" starts with "ct2x"."""
    for name in (MARKER, SIDECAR):
        try:
            record = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and str(record.get("created_by", "")).startswith("ct2x"):
            return True
    return False


class OutputFolder:
    """One run's claim on an output folder; see the module docstring for the guarantees.

    Args:
        path: the output folder (created with its parents when missing).
        overwrite: replace a non-empty folder, if ct2x wrote it.
        keep: paths that must survive (e.g. the working directory, the input): a folder that is or holds one of them
            is never replaced.
        command: recorded in the owner record and MARKER (default: this process's command line).
        name: how messages name the folder (default: `path` as given), e.g. "--out DIR".
    """

    def __init__(self, path: PathLike, overwrite: bool = False, keep: Iterable[PathLike] = (),
                 command: Optional[str] = None, name: Optional[str] = None):
        self.path = Path(path).expanduser().resolve()
        self.overwrite = overwrite
        self.keep = [Path(p).expanduser().resolve() for p in keep]
        self.command = shlex.join(sys.argv) if command is None else command
        self.name = str(path) if name is None else name
        self._staging: Optional[Path] = None  # the claimed staging folder
        self._owner_fd: Optional[int] = None  # holds the owner record's file lock

    def check(self) -> None:
        """Make every check `claim` makes, then let go: call it to fail before costly work. Clears leftovers."""
        if self.path.parent.is_dir():  # else nothing is there yet, and claim creates the parents
            self.claim()
            self._release()

    def claim(self) -> Path:
        """Check the folder, take the lock and return the empty folder to write into; raise before any work."""
        if self.path.parent == self.path:
            raise CT2XInputError(f"{self.name}: is a filesystem root; choose a folder")
        if self.path.exists() and not self.path.is_dir():
            raise CT2XInputError(f"{self.name}: is a file; choose a folder")
        for staging in (self._next_to, self._inside):
            if os.path.lexists(staging):
                self._clear_leftover(staging)
        staging = self._inside if self._stays_in_place() else self._next_to
        while True:
            if staging == self._next_to:
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as error:
                    raise self._refused(f"cannot create the folder ({error.filename})", error) from None
            try:
                os.mkdir(staging)
                break
            except FileExistsError:
                self._clear_leftover(staging)  # raises while its owner runs
            except OSError as error:
                if staging == self._inside:
                    raise self._refused("cannot write into the folder", error) from None
                if error.errno not in UNWRITABLE:
                    raise self._refused(f"cannot create ct2x's staging folder {staging} next to it", error) from None
                if not self.path.is_dir():
                    raise self._refused(f"cannot create the folder in {self.path.parent}", error) from None
                staging = self._inside
        self._staging = staging
        try:
            try:
                os.mkdir(staging / NEW)  # before the owner record: with a record, no NEW means published
                self._owner_fd = _write_owner(staging, self.command)
            except OSError as error:
                raise self._refused(f"cannot write ct2x's staging folder {staging}", error) from None
            self._check_replaceable()
        except BaseException:
            self._release()
            raise
        return staging / NEW

    def publish(self) -> None:
        """Mark the staged output as ct2x's and move it into place; on any failure the folder stays as it was."""
        staging = self._staging
        new = staging / NEW
        try:
            if not is_ct2x_output(new):
                record = {"created_by": f"ct2x {__version__}", "command": self.command, "finished": _now()}
                (new / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            _give_ordinary_modes(new, file_mode=_mode(staging / OWNER), folder_mode=_mode(new))
            self._check_replaceable()
            if staging == self._next_to:
                self._swap(new)
            else:
                self._move_in(new)
        except BaseException as error:
            try:
                self._undo(staging)
            except BaseException:
                self._release(remove=False)  # the next run finds the staging folder and finishes the undo
                raise
            self._release()
            if isinstance(error, OSError) and not isinstance(error, OutputFolderError):
                raise self._failed("moving the finished output into place", error, staging) from error
            raise
        self._release()

    def discard(self) -> None:
        """Remove the staging folder and let go of the folder, which stays as it was."""
        self._release()

    def __enter__(self) -> Path:
        return self.claim()

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.publish()
            return
        staging = self._staging
        self.discard()
        if isinstance(error, OSError) and not isinstance(error, OutputFolderError):
            raise self._failed("writing the output", error, staging) from error

    @property
    def _next_to(self) -> Path:
        return self.path.with_name(self.path.name + STAGING)

    @property
    def _inside(self) -> Path:
        return self.path / STAGING

    def _stays_in_place(self) -> bool:
        """An existing folder that must not be renamed: a mount point or one of `keep` (e.g. the working directory)."""
        return self.path.is_dir() and (self.path in self.keep or _is_mount_point(self.path))

    def _entries(self) -> List[str]:
        """Names in the folder, less ct2x's staging folder and a mount point's lost+found."""
        if not self.path.is_dir():
            return []
        ignored = {STAGING} | ({"lost+found"} if _is_mount_point(self.path) else set())
        return sorted(set(os.listdir(self.path)) - ignored)

    def _check_replaceable(self) -> None:
        """CT2XInputError unless the folder is missing or empty, or overwrite may replace it."""
        entries = self._entries()
        if not entries:
            return
        ct2x_output = is_ct2x_output(self.path)
        if not self.overwrite:
            if ct2x_output:
                raise CT2XInputError(f"{self.name}: holds an earlier ct2x output; pass --overwrite to replace it, "
                                     "or choose a new folder")
            raise CT2XInputError(f"{self.name}: folder is not empty and was not written by ct2x: "
                                 f"{_describe(self.path, entries)}; choose a new or empty folder (--overwrite replaces "
                                 "only folders ct2x wrote)")
        for path in self.keep:
            if path == self.path or self.path in path.parents:
                raise CT2XInputError(f"{self.name}: replacing it would delete {path}; choose another folder")
        if not ct2x_output:
            raise CT2XInputError(f"{self.name}: {_describe(self.path, entries)}, not written by ct2x; ct2x replaces "
                                 "only folders it wrote: delete it yourself or choose another folder")

    def _swap(self, new: Path) -> None:
        """Staging next to the folder: the old folder (if any) into the staging folder, the new one into its place."""
        if self.path.exists():
            os.chmod(new, _mode(self.path))
            os.rename(self.path, self._staging / PREVIOUS)
        os.rename(new, self.path)

    def _move_in(self, new: Path) -> None:
        """Staging inside the folder: its old entries into the staging folder, then the new ones into the folder."""
        moving = self._staging / PREVIOUS_MOVING
        os.mkdir(moving)
        for name in self._entries():
            os.rename(self.path / name, moving / name)
        os.rename(moving, self._staging / PREVIOUS)  # from here on, the folder's entries are all new ones
        for name in os.listdir(new):
            os.rename(new / name, self.path / name)
        os.rmdir(new)

    def _undo(self, staging: Path) -> str:
        """Put the folder back as it was before the run that staged in `staging` began publishing.

        Returns "unfinished" (publishing had not begun), "restored" (it had; undone) or "published" (it had ended).
        """
        new, previous, moving = staging / NEW, staging / PREVIOUS, staging / PREVIOUS_MOVING
        if not new.exists():  # moved into place, or the run was killed before making it (and its owner record)
            return "published" if (staging / OWNER).exists() else "unfinished"
        if staging == self._next_to:
            if not previous.exists():
                return "unfinished"
            os.rename(previous, self.path)
            return "restored"
        if previous.exists():
            for name in self._entries():
                os.rename(self.path / name, new / name)
            moving = previous
        elif not moving.exists():
            return "unfinished"
        for name in os.listdir(moving):
            os.rename(moving / name, self.path / name)
        return "restored"

    def _clear_leftover(self, staging: Path) -> None:
        """Undo and remove the staging folder of a run that is gone; CT2XInputError while its owner may still run."""
        if os.path.lexists(staging) and not staging.is_dir():
            raise CT2XInputError(f"{self.name}: {staging} is in the way (ct2x stages its output under that name); "
                                 "move it away")
        owner = _read_owner(staging)
        run = _describe_run(owner)
        with _owner_gone(staging) as gone:
            if not gone:
                raise CT2XInputError(self._busy_message(staging, owner, gone))
            try:
                outcome = self._undo(staging)
            except OSError as error:
                raise OutputFolderError(
                    f"{self.name}: {run} was stopped while moving its output into place, and putting the folder back "
                    f"failed: {error}. Its staging folder {staging} holds the earlier files ({PREVIOUS}/ or "
                    f"{PREVIOUS_MOVING}/) and the new ones ({NEW}/): move back what you need, then delete it",
                    error.errno) from None
            with contextlib.suppress(FileNotFoundError):  # cleared by another run meanwhile
                shutil.rmtree(staging)
        warnings.warn({
            "unfinished": f"{self.name}: removed {staging}, the staging folder of {run}, which was stopped before "
                          "it finished; the folder is as it was",
            "restored": f"{self.name}: {run} was stopped while moving its output into place; put the folder back as "
                        f"it was before and removed its staging folder {staging}",
            "published": f"{self.name}: removed {staging}, the staging folder of {run}, which was stopped just "
                         "after it finished; the folder holds that run's output",
        }[outcome], CT2XWarning, stacklevel=3)

    def _busy_message(self, staging: Path, owner: dict, gone: Optional[bool]) -> str:
        doing = f"another {_describe_run(owner)} is writing" if owner else "another ct2x run is starting to write"
        message = f"{self.name}: {doing} this folder; wait for it or choose another folder"
        if gone is None:
            message += f" (if no ct2x run is writing it any more, delete its staging folder {staging})"
        return message

    def _refused(self, what: str, error: OSError) -> OutputFolderError:
        return OutputFolderError(f"{self.name}: {what}: {error.strerror or error}", error.errno)

    def _failed(self, doing: str, error: OSError, staging: Path) -> OutputFolderError:
        message = f"{self.name}: {doing} failed: {error}"
        if str(staging) in message:
            message += (f"\n({staging} is the staging folder ct2x writes into before moving the finished output into "
                        "place; it was removed)")
        return OutputFolderError(f"{message}\nNothing was written: the folder is as it was.", error.errno)

    def _release(self, remove: bool = True) -> None:
        """Let go of the claim: remove the staging folder (unless told not to) and drop the owner record's lock."""
        if remove and self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
        if self._owner_fd is not None:
            os.close(self._owner_fd)
        self._staging = self._owner_fd = None


def _write_owner(staging: Path, command: str) -> Optional[int]:
    """Write the owner record into `staging`; returns a descriptor holding its file lock (None without file locks).

    The record is written under another name, locked, then renamed, so another run never finds one that is unlocked
    or half-written.
    """
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "command": command,
              "ct2x_version": __version__}
    temporary = staging / f"{OWNER}.writing"
    temporary.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if fcntl is None:
        os.rename(temporary, staging / OWNER)
        return None
    descriptor = os.open(temporary, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(temporary, staging / OWNER)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def _read_owner(staging: Path) -> dict:
    """The owner record of `staging`, or {} when there is none (yet)."""
    try:
        record = json.loads((staging / OWNER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


@contextlib.contextmanager
def _owner_gone(staging: Path) -> Iterator[Optional[bool]]:
    """Whether the run that made `staging` is gone: True (its record's lock is then held until the block ends), False
    while it runs, None when that cannot be told (no file locks here or on that filesystem)."""
    try:
        descriptor = os.open(staging / OWNER, os.O_RDONLY)
    except FileNotFoundError:  # no record: the owner is between its mkdir and the record, or was killed there
        try:
            age = time.time() - staging.stat().st_mtime
        except FileNotFoundError:  # gone meanwhile: nothing left to clear
            age = STARTING_SECONDS
        yield age >= STARTING_SECONDS
        return
    try:
        if fcntl is None:
            yield None
            return
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError:  # e.g. ENOLCK on a network filesystem without locks
            yield None
            return
        try:
            same = os.path.samestat(os.fstat(descriptor), os.stat(staging / OWNER))
        except FileNotFoundError:
            same = False
        yield same  # a record replaced meanwhile belongs to a new run
    finally:
        os.close(descriptor)


def _describe_run(owner: dict) -> str:
    """'ct2x run (pid 123, started 14:02:11, `ct2x drr --out x`)'; the host when it is not this one."""
    if not owner:
        return "ct2x run"
    host = owner.get("host")
    on_host = f" on {host}" if host and host != socket.gethostname() else ""
    return (f"ct2x run (pid {owner.get('pid', '?')}{on_host}, started {_when(owner.get('started'))}, "
            f"`{owner.get('command', '?')}`)")


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _when(text: Optional[str]) -> str:
    """ISO time -> 'HH:MM:SS' today, else 'YYYY-MM-DD HH:MM:SS' (local time)."""
    try:
        moment = datetime.datetime.fromisoformat(str(text)).astimezone()
    except ValueError:
        return "at an unknown time"
    return moment.strftime("%H:%M:%S" if moment.date() == datetime.date.today() else "%Y-%m-%d %H:%M:%S")


def _describe(folder: Path, entries: List[str]) -> str:
    """'holds 312 files (1.2 GB), e.g. IM0001.dcm, IM0002.dcm': what a folder ct2x will not touch holds."""
    paths = (os.path.join(root, name) for root, _, names in os.walk(folder) for name in names)
    sizes = [os.lstat(path).st_size for path in itertools.islice(paths, COUNT_LIMIT)]
    examples = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    if not sizes:
        return f"holds only empty folders ({examples})"
    count = f"over {COUNT_LIMIT}" if len(sizes) == COUNT_LIMIT else str(len(sizes))
    return f"holds {count} file{'s' * (len(sizes) != 1)} ({size_text(sum(sizes))}), e.g. {examples}"


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _give_ordinary_modes(folder: Path, file_mode: int, folder_mode: int) -> None:
    """Set every file and subfolder in `folder` (links left alone) to the mode a plain create gives."""
    for root, folders, files in os.walk(folder):
        for names, mode in ((folders, folder_mode), (files, file_mode)):
            for name in names:
                path = os.path.join(root, name)
                status = os.lstat(path)
                if not stat.S_ISLNK(status.st_mode) and stat.S_IMODE(status.st_mode) != mode:
                    os.chmod(path, mode)


def _is_mount_point(path: Path) -> bool:
    """os.path.ismount, plus Linux bind mounts within one filesystem (listed in /proc/self/mountinfo)."""
    if os.path.ismount(path):
        return True
    try:
        lines = Path("/proc/self/mountinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return False
    return any(_unescape_octal(line.split(" ")[4]) == str(path) for line in lines if line.count(" ") >= 4)


def _unescape_octal(text: str) -> str:
    """/proc/self/mountinfo writes a space in a path as \\040, and so on."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), text)
