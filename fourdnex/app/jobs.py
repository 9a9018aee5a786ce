"""Where app.py's jobs keep their files: one folder per job under a temporary root, removed after :data:`JOB_TTL_S`.

A job's folder name is a random token, so that the page of one visitor cannot guess the address of another's files
(the viewer and the downloads are served by that name). Folders older than the time to live are removed whenever a
job starts and by a sweep every :data:`SWEEP_EVERY_S`; a job that fails removes its folder at once.
"""

from __future__ import annotations

import re
import secrets
import shutil
import tempfile
import threading
import time
import zipfile
from pathlib import Path

#: How long a job's files are kept, in seconds: the page plays its videos and the viewer reads its recording from
#: them, and the archive is built from them, so they must outlive a visitor's look at the result; an hour is that,
#: while a busy server's disk holds no more than an hour of jobs (about 2 GB per job with the real model at 49 x
#: 480 x 720, the archive included; about 50 MB with the demo model's 25 x 96 x 144).
JOB_TTL_S = 3600
#: How often the folders are swept besides at every job's start, in seconds.
SWEEP_EVERY_S = 300
#: What a job's folder name looks like (secrets.token_hex(16)).
JOB_NAME = re.compile(r"^[0-9a-f]{32}$")
#: Files the archive stores as they are: already compressed, so deflating them again costs time and saves nothing.
STORED_SUFFIXES = {".mp4", ".png", ".jpg", ".npz", ".rrd"}


class JobFolders:
    """The job folders under ``root`` (default: a new folder in the system's temporary directory)."""

    def __init__(self, root: str | Path | None = None, ttl_s: float = JOB_TTL_S) -> None:
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="fourdnex-app-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.ttl_s = ttl_s
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def new(self) -> Path:
        """A fresh, empty job folder (old ones are swept first)."""
        self.sweep()
        folder = self.root / secrets.token_hex(16)
        folder.mkdir()
        return folder

    def find(self, name: str) -> Path | None:
        """The folder of job ``name`` while it is kept, else None (also for names that are not job names)."""
        if not JOB_NAME.match(name):
            return None
        folder = self.root / name
        return folder if folder.is_dir() else None

    def sweep(self, now: float | None = None) -> list[str]:
        """Remove the folders older than the time to live; returns their names."""
        now = time.time() if now is None else now
        removed = []
        for folder in self.root.iterdir():
            if not (folder.is_dir() and JOB_NAME.match(folder.name)):
                continue
            try:
                age = now - folder.stat().st_mtime
            except FileNotFoundError:
                continue
            if age > self.ttl_s:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        return removed

    def start_sweeping(self, every_s: float = SWEEP_EVERY_S) -> None:
        """Sweep every ``every_s`` seconds in a daemon thread, until :meth:`close`."""

        def loop() -> None:
            while not self._stop.wait(every_s):
                self.sweep()

        self._sweeper = threading.Thread(target=loop, name="job-sweeper", daemon=True)
        self._sweeper.start()

    def close(self, remove: bool = True) -> None:
        """Stop sweeping and (by default) remove every job's files."""
        self._stop.set()
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)


def write_archive(folder: Path, archive: Path, leave_out: tuple[Path, ...] = ()) -> Path:
    """Zip every file under ``folder`` (paths relative to it) into ``archive``, but the archive itself and
    ``leave_out``; already compressed files are stored, the rest deflated."""
    skip = {archive.resolve(), *(p.resolve() for p in leave_out)}
    partial = archive.with_name(f".{archive.name}.partial")
    with zipfile.ZipFile(partial, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.resolve() in skip or path.name.startswith("."):
                continue
            stored = path.suffix.lower() in STORED_SUFFIXES
            zf.write(
                path,
                path.relative_to(folder).as_posix(),
                compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED,
                compresslevel=None if stored else 1,
            )
    partial.replace(archive)
    return archive
