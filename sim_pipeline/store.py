"""The object store: where chunks, image bytes and embeddings live between stages.

Keys are ``/``-separated paths. Every write is atomic (readers see the old object or the new one,
never half of one), so a crashed stage leaves nothing that a rerun would mistake for finished work.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from sim_pipeline.errors import UserError


class ObjectStore(Protocol):
    def exists(self, key: str) -> bool: ...
    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def uri(self, key: str) -> str: ...


def read_json(store: ObjectStore, key: str) -> Any:
    return json.loads(store.read_bytes(key))


def write_json(store: ObjectStore, key: str, value: Any) -> None:
    """Sorted keys and fixed separators: the same value always gives the same bytes."""
    data = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    store.write_bytes(key, data.encode("utf-8"))


class LocalStore:
    """A folder on disk; atomic by writing a temp file in the same folder, then renaming."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"store key escapes the store: {key!r}")
        return path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def uri(self, key: str) -> str:
        return str(self._path(key))


class S3Store:
    """An S3 bucket prefix through boto3; the endpoint comes from the standard AWS configuration.

    A single PUT is atomic in S3: an object is visible whole or not at all.
    """

    def __init__(self, bucket: str, prefix: str = "") -> None:
        try:
            import boto3
        except ImportError:
            raise UserError("An s3:// store needs boto3: pip install 'sim-pipeline[s3]'.") from None
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = boto3.client("s3")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def read_bytes(self, key: str) -> bytes:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except self.client.exceptions.NoSuchKey:
            raise KeyError(key) from None
        return body.read()

    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


def open_store(location: str) -> ObjectStore:
    """``s3://bucket/prefix`` or a local folder path."""
    parsed = urlparse(location)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise UserError(f"SIM_PIPELINE_STORE={location!r} names no bucket.")
        return S3Store(parsed.netloc, parsed.path)
    if parsed.scheme not in ("", "file"):
        raise UserError(f"SIM_PIPELINE_STORE={location!r}: use a folder path or s3://bucket/prefix.")
    return LocalStore(parsed.path if parsed.scheme == "file" else location)
