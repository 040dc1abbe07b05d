"""Row stores: [n, width] float32 arrays filled by rows in any order, in memory or streamed to ``.npy`` files.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np


class RowStore:
    """[n, width] float32 arrays filled by rows in any order: in memory, or streamed to ``.npy`` files.

    With a ``directory``, rows are written to the file as they come (``os.pwrite``, no mapping) and
    the finished array is read back memory-mapped: nothing of it stays in process memory, so a pass
    over 4x the images or 11 candidates needs no more RAM than one. The files are temporary until a
    caller moves them into a cache (:meth:`ArrayCache.put`); :meth:`discard` removes the rest.
    """

    def __init__(self, n: int, directory: str | Path | None = None):
        self.n = n
        self.directory = None if directory is None else Path(directory)
        self._files: list[Rows] = []

    def new(self, width: int) -> "Rows":
        if self.directory is None:
            return Rows(np.zeros((self.n, width), dtype=np.float32))
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f".rows-{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp.npy"
        self._files.append(Rows(path=path, shape=(self.n, width)))
        return self._files[-1]

    def discard(self) -> None:
        """Close and delete the files not moved into a cache (arrays already returned stay readable)."""
        for rows in self._files:
            rows.close()
            if rows.path is not None:
                rows.path.unlink(missing_ok=True)


class Rows:
    def __init__(self, array: np.ndarray | None = None, *, path: Path | None = None,
                 shape: tuple[int, int] | None = None):
        self.array, self.path = array, path
        if path is not None:
            assert shape is not None
            with open(path, "wb") as f:
                np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
                                                          "fortran_order": False, "shape": shape})
                self.offset = f.tell()
                f.truncate(self.offset + shape[0] * shape[1] * 4)
            self.row_bytes = shape[1] * 4
            self.fd: int | None = os.open(path, os.O_WRONLY)

    def write(self, index: np.ndarray, rows: np.ndarray) -> None:
        """Put ``rows[i]`` at row ``index[i]``; consecutive indices go out in one write."""
        if self.array is not None:
            self.array[index] = rows
            return
        order = np.argsort(index, kind="stable")
        index, rows = index[order], np.ascontiguousarray(rows[order], dtype="<f4")
        breaks = np.flatnonzero(np.diff(index) != 1) + 1
        for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(index)]):
            os.pwrite(self.fd, rows[start:stop].tobytes(), self.offset + int(index[start]) * self.row_bytes)

    def close(self) -> None:
        if self.array is None and self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def result(self) -> np.ndarray:
        if self.array is not None:
            return self.array
        self.close()
        return np.load(self.path, mmap_mode="c")
