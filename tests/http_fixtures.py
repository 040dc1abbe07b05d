"""A loopback HTTP server for tests, and hub copies in the CLIP_benchmark / DataComp WebDataset layout.

``serve(directory)`` serves a folder from ``http.server`` on 127.0.0.1 in a daemon thread, for the
duration of a ``with`` block (always shut down and closed, even when the test fails); ``faults`` make
it break a file mid-way (the server "dies": it closes the connection after a number of bytes) or
flip one byte of it. Nothing here reaches beyond the loopback interface.
"""
from __future__ import annotations

import http.server
import io
import tarfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image


@dataclass
class Faults:
    """What the server does wrong: ``truncate[name] = n`` sends n bytes of that file and drops the
    connection; ``flip[name] = i`` sends the file with byte i inverted. ``requests`` lists the paths asked for."""

    truncate: dict[str, int] = field(default_factory=dict)
    flip: dict[str, int] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)


class _Handler(http.server.SimpleHTTPRequestHandler):
    faults: Faults
    timeout = 10  # seconds per socket operation: a stuck client cannot hold a test

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's signature
        pass

    def do_GET(self) -> None:
        rel = self.path.lstrip("/").split("?")[0]
        self.faults.requests.append(rel)
        path = Path(self.translate_path(self.path))
        if rel not in self.faults.truncate and rel not in self.faults.flip or not path.is_file():
            return super().do_GET()
        data = bytearray(path.read_bytes())
        if rel in self.faults.flip:
            data[self.faults.flip[rel]] ^= 0xFF
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(bytes(data[: self.faults.truncate.get(rel, len(data))]))
        self.wfile.flush()
        self.close_connection = True  # the server "dies" mid-file: the client sees the connection drop


@contextmanager
def serve(directory: Path, faults: Faults | None = None) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` serving ``directory`` while the block runs."""
    faults = faults if faults is not None else Faults()
    handler = type("Handler", (_Handler,), {"faults": faults})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(directory)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def image_bytes(seed: int, size=(14, 12), fmt: str = "webp", border: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    if border:
        arr[0, :], arr[-1, :], arr[:, 0], arr[:, -1] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt.upper(), **({"lossless": True} if fmt == "webp" else {}))
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_copy(root: Path, classnames: Sequence[str], labels: Sequence[int], *, split: str = "test",
               per_tar: int = 3, npy: Sequence[np.ndarray] | None = None, border: bool = False,
               fmt: str = "webp") -> Path:
    """A hub copy in the CLIP_benchmark layout: classnames, templates, ``split/nshards.txt`` and tars of
    ``sNNNNNNN.<fmt>`` + ``.cls`` (+ ``.npy``), written as webdataset's ShardWriter would."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    shards = max(1, -(-len(labels) // per_tar))
    (root / split / "nshards.txt").write_text(f"{shards}")
    for j in range(shards):
        with tarfile.open(root / split / f"{j}.tar", "w") as tar:
            for index in range(j * per_tar, min(len(labels), (j + 1) * per_tar)):
                key = "s%07d" % index
                _add(tar, f"{key}.{fmt}", image_bytes(index, fmt=fmt, border=border))
                _add(tar, f"{key}.cls", str(labels[index]).encode("ascii"))
                if npy is not None:
                    buf = io.BytesIO()
                    np.save(buf, npy[index])
                    _add(tar, f"{key}.npy", buf.getvalue())
    return root
