"""Content-addressed blob cache on a worker: files named by their sha256, verified on upload."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

__all__ = ["BlobStore", "BlobUpload", "sha256_file"]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()


def check_digest(digest: str) -> str:
    if not _HEX64.fullmatch(digest or ""):
        raise ValueError(f"bad sha256 {digest!r}: expected 64 lowercase hex characters")
    return digest


class BlobUpload:
    """One upload in progress: bytes go to a temp file, verified against the declared hash and size."""

    def __init__(self, store: BlobStore, digest: str, size: int, max_size: int) -> None:
        check_digest(digest)
        if size > max_size:
            raise ValueError(f"blob of {size} bytes exceeds this worker's limit of {max_size}")
        self.store, self.digest, self.size = store, digest, size
        fd, name = tempfile.mkstemp(dir=store.root, prefix=".upload-")
        self._file = os.fdopen(fd, "wb")
        self._tmp = Path(name)
        self._hash = hashlib.sha256()
        self.received = 0

    def write(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self.size:
            self.abort()
            raise ValueError(f"blob {self.digest[:12]}: more bytes than the declared {self.size}")
        self._hash.update(data)
        self._file.write(data)

    def finish(self) -> Path:
        self._file.close()
        got = self._hash.hexdigest()
        if self.received != self.size or got != self.digest:
            self._tmp.unlink(missing_ok=True)
            raise ValueError(
                f"blob upload rejected: got {self.received} bytes with sha256 {got[:12]}..., "
                f"declared {self.size} bytes with sha256 {self.digest[:12]}...; the file was corrupted in transit "
                "or the client sent the wrong hash"
            )
        final = self.store.path(self.digest)
        os.replace(self._tmp, final)
        return final

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


class BlobStore:
    def __init__(self, root: str | os.PathLike[str], max_blob: int = 1 << 40) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".upload-*"):  # left by a worker that died mid-upload
            stale.unlink(missing_ok=True)
        self.max_blob = max_blob

    def path(self, digest: str) -> Path:
        return self.root / check_digest(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def missing(self, digests: list[str]) -> list[str]:
        return [d for d in digests if not self.has(d)]

    def begin(self, digest: str, size: int) -> BlobUpload:
        return BlobUpload(self, digest, size, self.max_blob)
