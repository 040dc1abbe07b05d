"""Where shards live when they are not in a local directory: URLs, how they are joined, opened and hashed.

A *location* is a local directory (a path) or a URL prefix under which the files of a shard set (or
of a hub copy to import) sit. Three kinds of URL are read:

* ``http://`` and ``https://`` (object storage, the Hugging Face hub's ``resolve`` links, a mirror):
  read with :mod:`urllib.request` with a socket timeout, so a stalled server ends in an error rather
  than a hang (webdataset's own ``gopen`` runs ``curl`` without a read timeout), and a connection
  that breaks mid-file is reported with the bytes that arrived;
* ``file://`` URLs, read as local files;
* ``pipe:CMD`` (only for ``shard import-wds``, typed by the user on the command line: a config file
  never runs a command), opened by ``webdataset.gopen``: ``{}`` in CMD is replaced by the file's path
  under the prefix (``pipe:aws s3 cp s3://bucket/wds_imagenet-a/{} -``); without ``{}`` the path is
  appended (``pipe:curl -s -L https://host/wds_imagenet-a/``). The command's exit status is checked.

Any other ``scheme://`` is handed to :mod:`fsspec` where it has an implementation (``s3://`` with
s3fs installed, ...). :class:`HashingReader` hashes what is read through it, so a shard is checked
against its manifest's sha256 while it streams, without a second read.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

from robustbench_ft.shards.manifest import MANIFEST_FILE, REBUILD_HINT, Manifest, ShardError

HTTP_TIMEOUT = 60.0  # seconds without a byte before a read fails (webdataset's curl has none)
STREAM_SCHEMES = ("http", "https", "file")  # what evaluation streams from (no commands from config files)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_CHUNK = 1 << 20
_SHARD_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\.tar")
_manifests: dict[str, Manifest] = {}  # URL -> manifest, fetched once per process


def scheme(location: str | os.PathLike) -> str | None:
    """The URL scheme of ``location`` ("https", "file", "pipe", "s3", ...), or None for a local path."""
    if not isinstance(location, str):
        return None
    if location.startswith("pipe:"):
        return "pipe"
    match = _SCHEME.match(location)
    return match.group(1).lower() if match else None


def is_url(location: str | os.PathLike) -> bool:
    return scheme(location) is not None


def as_location(location: str | os.PathLike) -> str | Path:
    """A URL stays a string (``Path`` would fold ``https://`` into ``https:/``); a path becomes a Path."""
    return location if is_url(location) else Path(location)


def join(base: str | os.PathLike, *parts: str) -> str | Path:
    """``base`` with the relative path ``parts`` below it (``{}`` of a ``pipe:`` command replaced)."""
    rel = "/".join(p.strip("/") for p in parts if p)
    if not is_url(base):
        return Path(base).joinpath(*[p for p in rel.split("/") if p])
    base = str(base)
    if scheme(base) == "pipe":
        return base.replace("{}", rel) if "{}" in base else base + rel
    return base.rstrip("/") + "/" + rel


def describe(location: str | os.PathLike) -> str:
    """``location`` for messages: a ``pipe:`` command is shown as given, a URL without its query string
    (signed object-storage links carry credentials there)."""
    text = str(location)
    if scheme(text) in ("http", "https"):
        parsed = urllib.parse.urlsplit(text)
        return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, parsed.path, "", ""))
    return text


def check_stream_location(location: str, what: str) -> None:
    """Refuse a URL evaluation cannot stream from (a ``pipe:`` command in a config, an unknown scheme)."""
    if scheme(location) not in STREAM_SCHEMES:
        raise ValueError(f"{what} {describe(location)!r}: evaluation streams shards from http://, https:// or file:// "
                         "URLs (or reads a local directory); for other storage, mirror the shards over http(s) or "
                         "import them with `robustbench-ft shard import-wds`")


def open_url(location: str | os.PathLike, timeout: float = HTTP_TIMEOUT) -> BinaryIO:
    """A binary stream of the file at ``location`` (see the module docstring for the schemes).

    A missing file raises FileNotFoundError naming it; a server or command that fails, ShardError.
    """
    kind = scheme(location)
    if kind is None:
        return open(location, "rb")
    url = str(location)
    if kind == "file":
        return open(urllib.request.url2pathname(urllib.parse.urlsplit(url).path), "rb")
    if kind in ("http", "https"):
        return _open_http(url, timeout)
    if kind == "pipe":
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    try:
        import fsspec

        return fsspec.open(url, "rb").open()
    except (ImportError, ValueError) as exc:
        raise ValueError(f"cannot open {describe(url)}: no reader for {kind}:// URLs ({exc}); use http(s)://, "
                         "file://, a pipe: command or a local directory") from None


def _open_http(url: str, timeout: float) -> BinaryIO:
    request = urllib.request.Request(url, headers={"User-Agent": "robustbench-ft"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (the scheme is checked above)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise FileNotFoundError(f"{describe(url)}: not found (HTTP 404)") from None
        raise ShardError(f"{describe(url)}: the server answered HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ShardError(f"{describe(url)}: cannot connect ({reason})") from None


def read_bytes(location: str | os.PathLike, limit: int = 64 << 20) -> bytes:
    """The whole (small) file at ``location``: manifests, class lists, counts; at most ``limit`` bytes."""
    reader = HashingReader(open_url(location), str(location))  # it closes the stream, naming a failed command
    try:
        data = reader.read(limit + 1)
    finally:
        reader.close()
    if len(data) > limit:
        raise ShardError(f"{describe(location)} is larger than {limit} bytes; is it the right file?")
    return data


def read_text(location: str | os.PathLike) -> str:
    try:
        return read_bytes(location).decode("utf-8")
    except UnicodeDecodeError:
        raise ShardError(f"{describe(location)} is not UTF-8 text") from None


class HashingReader(io.RawIOBase):
    """A read-only stream that hashes (sha256) and counts every byte read through it.

    Read errors of the underlying stream (a connection that breaks, a command that fails) become one
    :class:`ShardError` naming ``name`` and how many bytes had arrived. :meth:`finish` reads what the
    consumer left (a tar reader stops at the end-of-archive blocks, before the padding), closes the
    stream, and returns ``(size, sha256)`` of the whole file.
    """

    def __init__(self, stream: BinaryIO, name: str):
        super().__init__()
        self._stream = stream
        self.name = name
        self.size = 0
        self._digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        try:
            data = self._stream.read(size if size is not None and size >= 0 else _CHUNK)
        except ShardError:
            raise
        except Exception as exc:  # noqa: BLE001 - http.client, socket, subprocess and fsspec errors alike
            raise ShardError(f"{describe(self.name)}: reading failed after {self.size} bytes ({_reason(exc)}); the "
                             "server or connection went away, or the command failed") from None
        if not data and size != 0:
            # http.client ends a body cut short by a dropped connection as if it were complete; the
            # bytes still owed by its Content-Length tell the two apart
            owed = getattr(self._stream, "length", None)
            if isinstance(owed, int) and not isinstance(owed, bool) and owed > 0:
                raise ShardError(f"{describe(self.name)}: reading failed after {self.size} bytes ({owed} more were "
                                 "announced); the server or connection went away")
        self._digest.update(data)
        self.size += len(data)
        return data

    def finish(self) -> tuple[int, str]:
        while self.read(_CHUNK):
            pass
        self.close()
        return self.size, self._digest.hexdigest()

    def close(self) -> None:
        if not self.closed:
            try:
                self._stream.close()  # a webdataset Pipe checks its command's exit status here
            except Exception as exc:  # noqa: BLE001
                raise ShardError(f"{describe(self.name)}: {_reason(exc)}") from None
            finally:
                super().close()


def _reason(exc: BaseException) -> str:
    status = re.search(r": exit (-?\d+) \(read\)", str(exc))  # a webdataset Pipe whose command failed
    if status:
        return f"the command exited with status {status.group(1)}"
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    return f"{type(exc).__name__}: {text[:200]}"


def load_manifest(location: str | os.PathLike) -> Manifest:
    """The manifest of the shard set at ``location``: read from a directory, or fetched (once per process)
    from ``<url>/manifest.json``. A fetched manifest may only name plain shard files beside it."""
    if not is_url(location):
        return Manifest.load(location)
    url = str(location)
    if url not in _manifests:
        where = join(url, MANIFEST_FILE)
        try:
            text = read_text(where)
        except FileNotFoundError:
            raise ShardError(f"no {MANIFEST_FILE} at {describe(where)}: the shard set is not there, or its upload "
                             f"is incomplete; {REBUILD_HINT}") from None
        manifest = Manifest.from_json(text, describe(where))
        odd = next((s.name for s in manifest.shards if not _SHARD_NAME.fullmatch(s.name) or ".." in s.name), None)
        if odd is not None:
            raise ShardError(f"{describe(where)} names the shard {odd[:80]!r}; a streamed set's shards are plain "
                             "NAME.tar files beside its manifest")
        _manifests[url] = manifest
    return _manifests[url]
