"""Writing files so that a crash or a kill never leaves a half-written output.

Every output is written to a temporary name beside it and renamed onto it. Temporary names
carry the writing process (`.NAME.PID-HOST.RANDOM.part.SUFFIX`, at most 255 bytes whatever
the length of NAME), so that a run cleans up what a killed run of its own host left
(`remove_stale_temporaries`) and never touches the live temporary file of another process.
Files that belong together (labels and their sidecar, weights and their card) are renamed
into place one after the other with SIGINT and SIGTERM held back until both are there
(`replace_together`); weights keep the previous pair until the new one is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from pathlib import Path

PART = ".part"
NAME_MAX = 255  # bytes in a file name on the file systems we know (ext4, xfs, btrfs, NFS)
FOREIGN_STALE_SECONDS = 24 * 3600  # another host's temporary file older than this is dead
PID_DIGITS = 7  # Linux pids are below 2**22 (4194304): names of one length for one target
# .NAME.PID-HOST.RANDOM.part[.SUFFIX]: RANDOM is mkstemp's, 8 of [a-z0-9_]
_TEMPORARY = re.compile(
    rf"\..+\.(?P<pid>\d{{{PID_DIGITS}}})-(?P<host>[0-9a-f]{{8}})\.[a-z0-9_]{{8}}{re.escape(PART)}"
)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM (what `timeout`, `kill` and SLURM send) while `handle_signals` is
    active: raised like Ctrl-C's KeyboardInterrupt, so that every `finally` cleans up."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM, as the shell reports


_held = threading.local()
_pending: list[int] = []


def _on_signal(signum: int, frame) -> None:
    if getattr(_held, "depth", 0) > 0:
        _pending.append(signum)  # raised when the files that belong together are in place
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` inside this block (main thread only; elsewhere
    the block changes nothing). The previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, _on_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _pending.clear()


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back (under `handle_signals`) until the block is done; a signal
    that came meanwhile is raised at its end. Nothing inside should take long."""
    _held.depth = getattr(_held, "depth", 0) + 1
    try:
        yield
    finally:
        _held.depth -= 1
        if _held.depth == 0 and _pending:
            signum = _pending[0]
            _pending.clear()
            raise Interrupted(signum)


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def process_tag(pid: int | None = None) -> str:
    """'PID-HOST' as temporary names carry it (PID zero-padded, HOST hashed to 8 digits)."""
    return f"{os.getpid() if pid is None else pid:0{PID_DIGITS}d}-{_host_tag()}"


def output_suffix(path: Path) -> str:
    """'.nii.gz' (as spelled in the name) for 'x.nii.gz', else the last suffix: writers pick
    the format from it."""
    suffix = compound_suffix(path)
    return path.name[len(path.name) - len(suffix) :] if suffix else ""


def _name_budget(folder: Path) -> int:
    try:
        return min(NAME_MAX, os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return NAME_MAX


def temporary_parts(path: Path) -> tuple[str, str]:
    """('.NAME', '.part.SUFFIX'): a temporary file of `path` is '.NAME.TAG.RANDOM.part.SUFFIX',
    NAME shortened (to whole UTF-8 characters) so that the whole fits in a file name."""
    suffix = f"{PART}{output_suffix(path)}"
    fixed = len(os.fsencode(f"..{process_tag(0)}.{'x' * 8}{suffix}"))  # every tag is as long
    budget = _name_budget(path.parent) - fixed
    name = os.fsencode(path.name)
    if len(name) > budget:
        name = name[: max(1, budget)].decode("utf-8", "ignore").encode("utf-8") or b"x"
    return f".{os.fsdecode(name)}", suffix


def make_temporary(path: Path) -> Path:
    """A new empty file beside `path`, named for it and for this process; mode 0600."""
    import tempfile

    head, suffix = temporary_parts(path)
    fd, name = tempfile.mkstemp(prefix=f"{head}.{process_tag()}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    _own.add(os.path.abspath(name))
    return Path(name)


_own: set[str] = set()  # temporary files this process is writing (see write_atomically)


def temporary_owner(candidate: Path) -> tuple[int, str] | None:
    """(pid, host tag) of the process that made `candidate`, if it is named as the temporary
    files here are; else None."""
    match = _TEMPORARY.match(candidate.name)
    return (int(match["pid"]), match["host"]) if match else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or we cannot tell: keep its files
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files in `folder` that a killed process left: those of a process
    of this host that no longer runs, and another host's older than FOREIGN_STALE_SECONDS.
    A live process's temporary file is never touched. Returns what was removed."""
    removed: list[Path] = []
    host = _host_tag()
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for candidate in entries:
        owner = temporary_owner(candidate)
        if owner is None:
            continue
        if owner[1] == host:
            stale = not _alive(owner[0])
        else:
            try:
                stale = time.time() - candidate.stat().st_mtime > FOREIGN_STALE_SECONDS
            except OSError:
                continue
        if stale:
            with suppress(FileNotFoundError, IsADirectoryError):
                candidate.unlink()
                removed.append(candidate)
    return removed


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary file beside `path`, then rename it onto `path`. When
    `path` is itself a temporary file this process is writing (the labels of
    `replace_together`, given to a label writer), write(path) writes it directly: its own
    rename makes it whole, and no temporary file of a temporary file is left by a kill."""
    if os.path.abspath(path) in _own:
        write(Path(path))
        return
    replace_together([path], lambda temporaries: write(temporaries[0]))


def previous_path(path: Path) -> Path:
    """Where `replace_together(keep_previous=True)` keeps the file it replaces until the new
    ones are all in place: `.STEM.previous-PID.SUFFIX` (a pair stays loadable as a pair)."""
    suffix = output_suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    return path.with_name(f".{stem}.previous-{os.getpid()}{suffix}")


def replace_together(
    paths: Sequence[Path],
    write: Callable[[list[Path]], None],
    keep_previous: bool = False,
) -> None:
    """Call write(temporaries) with one temporary file beside each of `paths`, then rename
    each onto its path, in order, with SIGINT and SIGTERM held back until all are in place.
    On any failure before the renames the temporaries are removed and nothing is replaced.

    keep_previous: existing files are first linked to `previous_path` names and removed only
    once every new file is in place, so that a SIGKILL between two renames leaves the whole
    previous set beside the new one (weights and their card)."""
    paths = [Path(p) for p in paths]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    temporaries: list[Path] = []
    try:
        for path in paths:
            temporaries.append(make_temporary(path))
        write(list(temporaries))
        mode = 0o666 & ~_umask()
        for tmp in temporaries:
            os.chmod(tmp, mode)  # mkstemp makes 0600; outputs get the usual mode
        with signals_held():
            kept = _keep_previous(paths) if keep_previous else []
            for tmp, path in zip(temporaries, paths, strict=True):
                os.replace(tmp, path)
            for previous in kept:
                with suppress(FileNotFoundError):
                    previous.unlink()
    finally:
        for tmp in temporaries:
            _own.discard(os.path.abspath(tmp))
            with suppress(FileNotFoundError):
                tmp.unlink()


def _keep_previous(paths: Sequence[Path]) -> list[Path]:
    kept = []
    for path in paths:
        if not path.is_file():
            continue
        previous = previous_path(path)
        with suppress(FileNotFoundError):
            previous.unlink()
        try:
            os.link(path, previous)
        except OSError:  # a file system without hard links: a copy
            import shutil

            shutil.copy2(path, previous)
        kept.append(previous)
    return kept


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same resolved path, or (both existing) the same
    device and inode (hard links, bind mounts, symbolic links)."""
    try:
        if a.resolve() == b.resolve():
            return True
    except (OSError, RuntimeError):
        pass
    try:
        first, second = a.stat(), b.stat()
    except OSError:
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def compound_suffix(path: Path) -> str:
    """'.nii.gz' for 'x.nii.gz', else the last suffix, lower-case."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def stem_of(path: Path) -> str:
    suffix = compound_suffix(path)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
