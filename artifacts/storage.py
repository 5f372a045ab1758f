"""Where the bytes go: Django's storage API, and streaming request bodies into it.

By default a FileSystemStorage rooted at FETCHML_STORAGE_DIR. A deployment
that defines a `fetchml` alias in Django's STORAGES (e.g. django-storages'
S3Storage) gets that backend instead; nothing here assumes a local disk.
"""

import hashlib
import logging
import tarfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from django.conf import settings
from django.core.files.storage import FileSystemStorage, Storage, storages
from django.core.files.uploadedfile import TemporaryUploadedFile

from fetchml.errors import Invalid, PayloadTooLarge

logger = logging.getLogger("fetchml.artifacts")
STORAGE_ALIAS = "fetchml"
CHUNK_BYTES = 64 * 1024


def file_storage() -> Storage:
    if STORAGE_ALIAS in settings.STORAGES:
        return storages[STORAGE_ALIAS]
    # Built on each call (it is cheap) so the directory follows settings overrides.
    return FileSystemStorage(location=settings.FETCHML_STORAGE_DIR)


@dataclass
class Received:
    """A request body spooled to a local temporary file, with its size and digest."""

    file: TemporaryUploadedFile
    size: int
    sha256: str

    def close(self) -> None:
        # Deletes the temporary file (unless the storage already moved it away).
        self.file.close()


def too_large(limit: int, what: str) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"{what} exceeds the limit of {limit} bytes",
        details=[{"field": None, "message": f"limit is {limit} bytes"}],
    )


def receive(stream: BinaryIO, *, limit: int, declared_length: int | None, what: str) -> Received:
    """Copy a body to a temporary file chunk by chunk, hashing and counting as it comes.

    Never holds more than one chunk in memory. A declared Content-Length over
    the limit is refused before a byte is read; a body that grows past the
    limit is refused as soon as it does, and its temporary file removed.
    """
    if declared_length is not None and declared_length > limit:
        raise too_large(limit, what)
    spool = TemporaryUploadedFile("upload", "application/octet-stream", 0, None)
    digest = hashlib.sha256()
    size = 0
    try:
        while chunk := stream.read(CHUNK_BYTES):
            size += len(chunk)
            if size > limit:
                raise too_large(limit, what)
            digest.update(chunk)
            spool.write(chunk)
        spool.flush()
        spool.seek(0)
        spool.size = size
    except BaseException:
        spool.close()
        raise
    return Received(file=spool, size=size, sha256=digest.hexdigest())


def store(received: Received, key: str) -> str:
    """Save a received body under `key`; returns the key actually used.

    The file system backend moves the temporary file into place (no copy);
    other backends read it in chunks.
    """
    received.file.seek(0)
    return file_storage().save(key, received.file)


def delete_quietly(key: str) -> None:
    """Remove a blob whose row is gone (or never committed); a failure only leaks space."""
    try:
        file_storage().delete(key)
    except Exception:
        logger.exception("could not delete stored file %s", key)


def check_tar_gz(received: Received) -> None:
    """Minimal check that a snapshot opens as a .tar.gz: gzip framing and a first tar header.

    Deliberately not a full walk: decompressing a whole archive at upload
    would let a small gzip bomb burn the server's CPU. The agent extracts
    with tarfile's `data` filter, which refuses unsafe members.
    """
    received.file.seek(0)
    try:
        with tarfile.open(fileobj=received.file, mode="r:gz") as archive:
            first = archive.next()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise Invalid(
            "The snapshot is not a .tar.gz archive",
            details=[{"field": None, "message": f"could not open as tar.gz: {exc}"}],
        ) from exc
    finally:
        received.file.seek(0)
    if first is None:
        raise Invalid("The snapshot archive is empty", details=[{"field": None, "message": "no members"}])
