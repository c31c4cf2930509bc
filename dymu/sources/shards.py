"""webdataset tar shards, one image a sample: local files, ``pipe:CMD``, ``http(s)://`` and
fsspec URLs (``s3://``, ``gs://``, ...), with webdataset's brace expansion.

Every DataLoader worker walks all shards to keep one stream order (an item's index, and so
its batch, is its position in the stream). In a local plain ``.tar`` a worker reads only
the 512-byte headers and seeks past the data: an image's bytes are read by the one worker
that decodes it. Compressed and remote shards are read as tar streams (``r|*``), whole.

A shard that cannot be opened, breaks mid-stream, or whose ``pipe:`` command exits non-zero
becomes one bad item (``broken shard: ...``) after the samples read before the break; the
other shards still count. Local shards must exist up front; remote ones are found when read.
``http(s)`` is read with the standard library; other schemes through ``fsspec`` and its
backend package.

Why a spool: a worker cannot know the positions inside a shard it has not read, so every
worker reads every shard. Streaming a remote shard in every worker would download it once
per worker, and a download that broke in one worker but not in another would give the
workers different streams, so batches that depend on the worker count. With two or more
workers, the first worker to reach a remote shard therefore downloads it into a spool folder
(under ``$TMPDIR``) while the others wait on a file lock, and all of them read that one
copy; it is deleted once every worker has read it, so only a few shards are on disk at a
time. With zero or one worker (or without ``fcntl``, e.g. on Windows) remote shards are
streamed straight from the source. Under torchrun each process reads every shard.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from torch.utils.data import get_worker_info

from ..errors import DyMUError
from .items import RawItem

try:
    import fcntl
except ImportError:  # no file locks: every worker streams its own copy
    fcntl = None

HTTP_TIMEOUT = 60  # seconds without data before an HTTP shard counts as broken
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "abfs": "adlfs"}
_SIGPIPE = (-13, 128 + 13)  # how a pipe we stopped reading early may end
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "image", "img")


class ShardSource:
    """webdataset tar shards (``'train-{000..099}.tar'``, URLs, ``pipe:CMD``), in order."""

    def __init__(self, pattern: str) -> None:
        from webdataset.shardlists import expand_urls

        self.shards = list(expand_urls(pattern))
        self.remote = [is_remote(s) for s in self.shards]
        check_urls([s for s, far in zip(self.shards, self.remote, strict=True) if far])
        local = [s for s, far in zip(self.shards, self.remote, strict=True) if not far]
        missing = [s for s in local if not Path(s).is_file()]  # remote ones: found when read
        if missing:
            raise DyMUError(f"shard not found: {missing[0]} ({len(missing)} missing)")
        self.spool = ShardSpool() if any(self.remote) else None

    def __iter__(self) -> Iterator[RawItem]:
        for index, (shard, far) in enumerate(zip(self.shards, self.remote, strict=True)):
            if far:
                yield from self.spool.samples(index, shard)
            else:
                yield from _shard_samples(Path(shard))


def _shard_samples(shard: Path) -> Iterator[RawItem]:
    """A local shard's samples; a shard that cannot be read becomes one bad item."""
    try:
        tar, seekable = _open_tar(shard)
        with tar:
            yield from _tar_samples(str(shard), tar, shard if seekable else None)
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield RawItem(f"{shard}", error=f"broken shard: {exc}")


def _tar_samples(name: str, tar: tarfile.TarFile, path: Path | None = None) -> Iterator[RawItem]:
    """Group tar members by webdataset key (the path up to the first dot of the file name).

    With ``path`` (a tar opened for seeking) items hold spans into it, else the bytes.
    Raises what reading the tar raises; the items before the break are already out.
    """
    key, files = None, {}
    for member in tar:
        if not member.isfile():
            continue
        folder, _, base = member.name.rpartition("/")
        stem, _, ext = base.partition(".")
        sample = f"{folder}/{stem}" if folder else stem
        if sample != key and key is not None:
            yield _sample_item(name, key, files, path)
            files = {}
        key = sample
        if path is not None:
            files[ext.lower()] = (member.offset_data, member.size)
        else:
            files[ext.lower()] = tar.extractfile(member).read()
    if key is not None:
        yield _sample_item(name, key, files, path)


def _open_tar(shard: Path) -> tuple[tarfile.TarFile, bool]:
    """A plain tar opened for seeking, else (compressed) a stream; and which it is."""
    try:
        return tarfile.open(shard, "r:"), True
    except tarfile.ReadError:
        return tarfile.open(shard, "r|*"), False


def _sample_item(
    shard: str, key: str, files: dict[str, bytes | tuple[int, int]], path: Path | None
) -> RawItem:
    for ext in SHARD_IMAGE_KEYS:
        if ext in files:
            found = files[ext]
            if isinstance(found, tuple):
                return RawItem(f"{shard}:{key}", path=path, span=found)
            return RawItem(f"{shard}:{key}", data=found)
    return RawItem(f"{shard}:{key}", error=f"no image in sample (keys: {', '.join(files)})")


def scheme(url: str) -> str:
    """``pipe``, a URL's scheme in lower case (``https``, ``s3``, ...), or '' for a local path."""
    if url.startswith("pipe:"):
        return "pipe"
    head, sep, _ = url.partition("://")
    return head.lower() if sep and len(head) > 1 and head.replace("+", "").isalnum() else ""


def is_remote(url: str) -> bool:
    """Whether a shard is read as a stream (a pipe or a URL) rather than a local file."""
    return scheme(url) != ""


def check_urls(urls: list[str]) -> None:
    """Refuse a URL scheme whose package is not installed, before any work (once a scheme)."""
    for name in sorted({scheme(u) for u in urls} - {"pipe", "http", "https"}):
        package = BACKENDS.get(name)
        need = (
            f"fsspec and {package}: pip install fsspec {package}"
            if package
            else "fsspec: pip install fsspec"
        )
        try:
            import fsspec
        except ImportError:
            raise DyMUError(f"{name}:// shards need {need}") from None
        try:
            fsspec.get_filesystem_class(name)
        except ImportError as exc:
            if not package:
                need = f"an fsspec backend: {_say(exc).splitlines()[0]}"
            raise DyMUError(f"{name}:// shards need {need}") from None
        except ValueError as exc:  # a protocol fsspec does not know
            raise DyMUError(f"cannot read {name}:// shards: {exc}") from None


class ShardSpool:
    """Remote shards downloaded once for all DataLoader workers of this process (see above)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="dymu-shards-"))
        weakref.finalize(self, _remove, self.root, os.getpid())

    def samples(self, index: int, url: str) -> Iterator[RawItem]:
        """The samples of shard ``index`` (``url``): shared through the spool with 2+ workers."""
        info = get_worker_info()
        if info is None or info.num_workers < 2 or fcntl is None:
            return _read(url, lambda: _Stream(url))
        return self._shared(index, url, info.num_workers)

    def _shared(self, index: int, url: str, workers: int) -> Iterator[RawItem]:
        base = self.root / f"{index:06d}"
        lock = base.with_suffix(".lock")
        with _locked(lock):
            if not base.with_suffix(".tar").exists():
                _download(url, base)
        try:
            yield from _read(url, lambda: _Spooled(base))
        finally:  # also when the stream stops early (max_images)
            with _locked(lock):
                _count_reader(base, workers)


def _remove(root: Path, owner: int) -> None:
    if os.getpid() == owner:  # never from a forked worker's copy of the source
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _count_reader(base: Path, workers: int) -> None:
    """Note that one more worker is done with a spooled shard; the last one deletes it."""
    readers = base.with_suffix(".readers")
    with open(readers, "ab") as fh:
        fh.write(b".")
        done = fh.tell()
    if done >= workers:
        for suffix in (".tar", ".err", ".readers", ".lock"):
            base.with_suffix(suffix).unlink(missing_ok=True)


class _Stream:
    """An open remote shard: ``file`` to read; ``finish`` tells why a pipe failed."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.proc: subprocess.Popen | None = None
        kind = scheme(url)
        if kind == "pipe":
            self.errors = tempfile.TemporaryFile()
            self.proc = subprocess.Popen(
                url[5:], shell=True, stdout=subprocess.PIPE, stderr=self.errors
            )
            self.file = self.proc.stdout
        elif kind in ("http", "https"):
            self.file = urllib.request.urlopen(url, timeout=HTTP_TIMEOUT)
        else:
            import fsspec

            self.file = fsspec.open(url, "rb").open()

    def finish(self, complete: bool) -> str | None:
        """Why the source failed, when it says: a pipe's exit status (``complete``: read all)."""
        if self.proc is None:
            return None
        if complete:  # read what follows the tar's end, so the command can exit
            while self.file.read(1 << 20):
                pass
        self.file.close()
        try:
            status = self.proc.wait(timeout=None if complete else 5)
        except subprocess.TimeoutExpired:
            return None  # still running after a broken tar: close() ends it
        if status == 0 or (not complete and status in _SIGPIPE):
            return None
        self.errors.seek(0)
        lines = self.errors.read().decode(errors="replace").strip().splitlines()
        return f"`{self.url[5:]}` exited with status {status}" + (f": {lines[-1]}" if lines else "")

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.errors.close()
        self.file.close()


class _Spooled:
    """A spooled shard read like a stream; ``finish`` tells why its download failed."""

    def __init__(self, base: Path) -> None:
        self.problem = base.with_suffix(".err")
        self.file = open(base.with_suffix(".tar"), "rb")

    def finish(self, complete: bool) -> str | None:
        return self.problem.read_text() if self.problem.exists() else None

    def close(self) -> None:
        self.file.close()


def _read(url: str, opener: Callable[[], _Stream | _Spooled]) -> Iterator[RawItem]:
    """A shard's samples; failing to open, a break or a failed pipe: one bad item after them."""
    stream = None
    try:
        stream = opener()
        with tarfile.open(fileobj=stream.file, mode="r|*") as tar:
            yield from _tar_samples(url, tar)
        problem = stream.finish(complete=True)
    except Exception as exc:  # each network backend raises its own types: all mean broken
        problem = (stream.finish(complete=False) if stream is not None else None) or _say(exc)
    finally:
        if stream is not None:
            stream.close()
    if problem:
        yield RawItem(url, error=f"broken shard: {problem}")


def _download(url: str, base: Path) -> None:
    """Copy a shard to ``base.tar``: what arrived, even if it broke (then why, in ``.err``)."""
    part = base.with_suffix(".part")
    stream = None
    try:
        stream = _Stream(url)
        with open(part, "wb") as out:
            shutil.copyfileobj(stream.file, out, 1 << 20)
        problem = stream.finish(complete=True)
    except Exception as exc:  # as in _read
        problem = (stream.finish(complete=False) if stream is not None else None) or _say(exc)
    finally:
        if stream is not None:
            stream.close()
    if problem:
        base.with_suffix(".err").write_text(problem)
    part.touch()
    part.replace(base.with_suffix(".tar"))


def _say(exc: Exception) -> str:
    return str(exc).strip() or type(exc).__name__
