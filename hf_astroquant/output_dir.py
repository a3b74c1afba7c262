"""Where a command writes: checked before any work, replaced only when ours, never half-written.

- Apart: an output is never equal to, inside, or containing a path the command reads (the model,
  the checkpoint an export reads, a calibration or evaluation file, the tokenizer, the offload or
  resume folder), nor the directory the command runs in: replacing the output would delete it.
- Ours: `--overwrite` replaces an empty directory, or one that a command of ours completed (it
  holds `MANIFEST`, the list of every file that command wrote) and that holds nothing else. A
  user's own folder, or one where files were added since, is refused, naming what would be lost.
- Atomic: a command writes into a hidden sibling `.NAME.partial-PID-XXXX` and renames it into
  place when complete. The next command on the same output finds the partial folders of killed
  runs (their process is gone) and removes them, and refuses to start while another live run
  writes the same output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from .file_modes import apply_umask, current_umask, written_since

MANIFEST = ".hf-astroquant-files.json"
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>partial|old)-(?:(?P<pid>\d+)-)?[\w-]*$")


class OutputError(ValueError):
    """An output path that the command refuses to write (one line: the path and why)."""


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_apart(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], flag: str = "--out",
                folders: dict[str, str | os.PathLike | None] | None = None) -> None:
    """Refuse an output that is, holds or lies inside one of `inputs` ({what it is: its path}; paths
    that do not exist, such as Hub ids, and None are skipped), one of the `folders` the command fills
    (checked whether or not they exist yet), or the working directory."""
    target = Path(out).resolve()
    cwd = Path.cwd().resolve()
    if _within(cwd, target):
        raise OutputError(f"{flag} {out} is the directory this command runs in, or holds it; name a new directory "
                          "beside it")
    for what, path in {**inputs, **(folders or {})}.items():
        if path is None or what in inputs and not Path(path).exists():
            continue
        source = Path(path).resolve()
        if source == target:
            raise OutputError(f"{flag} {out} is {what} itself ({path}); writing it would replace what this command "
                              "reads: name another output")
        if _within(source, target):
            raise OutputError(f"{flag} {out} holds {what} ({path}); writing it would replace what this command "
                              "reads: name an output beside it")
        if _within(target, source):
            raise OutputError(f"{flag} {out} lies inside {what} ({path}); write outputs beside what a command reads, "
                              "not into it")


def _write_manifest(directory: Path, files) -> None:
    (directory / MANIFEST).write_text(json.dumps({"written_by": "hf-astroquant", "files": sorted(files)}, indent=1))


def record_written(directory: str | os.PathLike, paths) -> None:
    """Add `paths` (files a command of ours just wrote into an output of ours) to its MANIFEST; a folder
    without one is not ours to list."""
    directory = Path(directory)
    ours = output_files(directory)
    if ours is not None:
        _write_manifest(directory, ours | {Path(p).relative_to(directory).as_posix() for p in paths} - {MANIFEST})


def output_files(directory: str | os.PathLike) -> set[str] | None:
    """The files a completed command of ours recorded writing into `directory` (its MANIFEST), or None
    when it has no readable one."""
    try:
        files = json.loads((Path(directory) / MANIFEST).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return set(files) if isinstance(files, list) and all(isinstance(f, str) for f in files) else None


def _present(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_symlink() or not p.is_dir())


def check_replaceable(out: str | os.PathLike, overwrite: bool, flag: str = "--out") -> None:
    """Refuse to write a directory output where it would destroy something that is not ours."""
    out = Path(out)
    if out.is_symlink():
        raise OutputError(f"{flag} {out} is a symbolic link; name the directory itself")
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"{flag} {out} exists and is a file, not a directory; name a directory")
    present = _present(out)
    if not present:
        return
    if not overwrite:
        raise OutputError(f"{flag} {out} exists and is not empty; pass --overwrite to replace an earlier "
                          "hf-astroquant output there")
    ours = output_files(out)
    if ours is None:
        raise OutputError(f"{flag} {out} was not written by hf-astroquant (it has no {MANIFEST}); --overwrite "
                          "replaces only an earlier hf-astroquant output: move it away or name another output")
    foreign = [p for p in present if p != MANIFEST and p not in ours]
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise OutputError(f"{flag} {out} holds files that hf-astroquant did not write ({', '.join(foreign[:3])}{more}); "
                          "--overwrite would delete them: move them away or name another output")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def clean_leftovers(out: str | os.PathLike) -> list[str]:
    """Remove what killed runs left beside `out` (partial outputs; a previous output moved aside just
    before the kill is put back when `out` is missing) and return one line per thing done. A partial
    output whose run is still alive means another run writes `out`: refused."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    done = []
    for path in sorted(out.parent.iterdir()):
        m = _LEFTOVER.fullmatch(path.name)
        if not m or m["name"] != out.name:
            continue
        pid = int(m["pid"]) if m["pid"] else None
        if pid is not None and _alive(pid):
            raise OutputError(f"another hf-astroquant run (process {pid}) is writing {out} (into {path}); wait for "
                              "it to finish, or stop it, before writing the same output (if no such run is going "
                              f"on, process {pid} is another program: delete {path})")
        if m["kind"] == "old" and not out.exists() and not out.is_symlink():
            path.rename(out)
            done.append(f"restored {out} (a run killed while replacing it had moved it to {path.name})")
            continue
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        done.append(f"removed {path}, left by a killed run")
    return done


def prepare(out: str | os.PathLike, overwrite: bool, inputs: dict[str, str | os.PathLike | None],
            flag: str = "--out", folders: dict[str, str | os.PathLike | None] | None = None) -> Path:
    """Check `out` (see check_apart, check_replaceable) and return a fresh hidden sibling directory to
    write into (`finish` renames it)."""
    out = Path(out)
    check_apart(out, inputs, flag, folders)
    for line in clean_leftovers(out):
        print(f"hf-astroquant: {line}", file=sys.stderr)
    check_replaceable(out, overwrite, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))


def finish(tmp: Path, out: str | os.PathLike) -> None:
    """Record what `tmp` holds in its manifest, give its files the umask's modes and put it in place of `out`."""
    out = Path(out)
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp made it private
    _write_manifest(tmp, [p for p in _present(tmp) if p != MANIFEST])
    apply_umask(written_since(tmp, {}))  # a folder of our own: every file in it is one we wrote
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-x"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(out)


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
