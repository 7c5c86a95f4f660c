"""The object store: where chunks, image bytes and embeddings live between stages.

Keys are ``/``-separated paths. Every write is atomic (readers see the old object or the new one,
never half of one), so a crashed stage leaves nothing that a rerun would mistake for finished work.
Each object carries the sha256 of its bytes, recorded in the same atomic step as the bytes (S3 user
metadata; an extended attribute of the file on disk), and every read checks it: a damaged object
raises ``IntegrityError`` instead of feeding garbage to the next stage. Concurrent writers of one
key are safe: each write is whole, and the last one wins (``write_bytes``) or the first one does
(``create_bytes``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from sim_pipeline.core.errors import UserError
from sim_pipeline.core.files import is_stale_temp, temp_name

SHA256_XATTR = "user.sim_pipeline.sha256"


class IntegrityError(UserError):
    """An object whose bytes do not match the digest recorded when it was written."""


class MissingObject(KeyError):
    """A key the store does not hold (never written, or removed)."""


class ObjectStore(Protocol):
    parallel_writes: int  # writer threads that help, not hinder (disk: few; S3: many)

    def exists(self, key: str) -> bool: ...
    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes, sha256: str | None = None) -> None: ...
    def create_bytes(self, key: str, data: bytes, sha256: str | None = None) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list_keys(self, prefix: str = "") -> Iterator[str]: ...
    def stale_temporaries(self) -> Iterator[str]: ...
    def remove_temporary(self, location: str) -> None: ...
    def uri(self, key: str) -> str: ...


DIGEST_FIELD = "_sha256"
REPAIR_ADVICE = ("`sim-pipeline store verify --repair` removes damaged objects, and a rerun "
                 "recomputes them")


def _canonical(value: Any) -> bytes:
    """Sorted keys and fixed separators: the same value always gives the same bytes."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def write_json(store: ObjectStore, key: str, value: Any) -> None:
    """A dict carries the sha256 of its own canonical form (``_sha256``), so a damaged or edited
    record is caught when read, on any file system or object store, with or without xattrs."""
    if isinstance(value, dict):
        value = {**value, DIGEST_FIELD: sha256_bytes(_canonical(value))}
    store.write_bytes(key, _canonical(value))


def read_json(store: ObjectStore, key: str) -> Any:
    """The value ``write_json`` stored, verified; ``IntegrityError`` when it is damaged,
    ``KeyError`` when it is missing."""
    data = store.read_bytes(key)
    try:
        value = json.loads(data)
    except ValueError:
        raise IntegrityError(f"{store.uri(key)} is damaged (not JSON): {REPAIR_ADVICE}.") \
            from None
    if isinstance(value, dict) and DIGEST_FIELD in value:
        recorded = value.pop(DIGEST_FIELD)
        if recorded != sha256_bytes(_canonical(value)):
            raise IntegrityError(f"{store.uri(key)} is damaged (its content differs from the "
                                 f"digest it was written with): {REPAIR_ADVICE}.")
    return value


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_digest(uri: str, data: bytes, recorded: str | None) -> bytes:
    if recorded is not None and recorded != sha256_bytes(data):
        raise IntegrityError(f"{uri} is damaged (its sha256 differs from the one recorded when it "
                             f"was written): {REPAIR_ADVICE}.")
    return data


class LocalStore:
    """A folder on disk: write a temp file in the same folder (digest attached), then rename.

    The fetch stage writes two files per image, so the hot path avoids needless syscalls: keys
    are checked lexically, folders made once, temp names come from a counter.
    """

    parallel_writes = 4  # more threads only contend for the file system (and the GIL)

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self._root = str(self.root)
        self._folders: set[str] = set()
        self._serial = itertools.count()

    def __reduce__(self) -> tuple[type, tuple[str]]:
        """Picklable (for fetch processes) as its root alone."""
        return LocalStore, (self._root,)

    def _path(self, key: str) -> str:
        parts = key.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"store key escapes the store or is malformed: {key!r}")
        return os.path.join(self._root, *parts)

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def read_bytes(self, key: str) -> bytes:
        """Bytes and digest come from one open file, so a concurrent rename cannot mix them."""
        path = self._path(key)
        try:
            with open(path, "rb") as handle:
                data = handle.read()
                recorded = _get_digest(handle.fileno())
        except FileNotFoundError:
            raise MissingObject(key) from None
        return _check_digest(path, data, recorded)

    def write_bytes(self, key: str, data: bytes, sha256: str | None = None) -> None:
        path, tmp = self._write_temp(key, data, sha256)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    def create_bytes(self, key: str, data: bytes, sha256: str | None = None) -> bool:
        """Write only if absent (hard link: atomic and exclusive); False if the key exists."""
        path, tmp = self._write_temp(key, data, sha256)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Every key (under the folder ``prefix``), in sorted order; temp files skipped."""
        top = self._path(prefix.strip("/")) if prefix.strip("/") else self._root
        for folder, subfolders, files in os.walk(top):
            subfolders.sort()
            relative = os.path.relpath(folder, self._root).replace(os.sep, "/")
            for name in sorted(files):
                if not name.startswith("."):
                    yield name if relative == "." else f"{relative}/{name}"

    def stale_temporaries(self) -> Iterator[str]:
        """Temporary files whose writer was killed mid-write (see ``core.files``): debris."""
        for folder, subfolders, files in os.walk(self._root):
            subfolders.sort()
            for name in sorted(files):
                if name.startswith(".") and is_stale_temp(path := os.path.join(folder, name)):
                    yield path

    def remove_temporary(self, location: str) -> None:
        if os.path.commonpath([self._root, location]) == self._root:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(location)

    def _write_temp(self, key: str, data: bytes, sha256: str | None) -> tuple[str, str]:
        path = self._path(key)
        folder, name = os.path.split(path)
        if folder not in self._folders:
            os.makedirs(folder, exist_ok=True)
            self._folders.add(folder)
        tmp = os.path.join(folder, temp_name(name, next(self._serial)))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:  # the folder was removed behind our back (a prune): remake it
            os.makedirs(folder, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                _set_digest(handle.fileno(), sha256 or sha256_bytes(data))
        except BaseException:
            os.unlink(tmp)
            raise
        return path, tmp

    def uri(self, key: str) -> str:
        return self._path(key)


def _set_digest(fd: int, digest: str) -> None:
    """Best effort: a file system without user xattrs stores the file unverified."""
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: an OS without xattrs
        os.setxattr(fd, SHA256_XATTR, digest.encode("ascii"))


def _get_digest(fd: int) -> str | None:
    try:
        return os.getxattr(fd, SHA256_XATTR).decode("ascii")
    except (OSError, AttributeError):
        return None


_MISSING_BUCKET = ("NoSuchBucket",)
_REFUSED = ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
            "InvalidToken", "ExpiredToken", "AllAccessDisabled")
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")
_LOST_RACE = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


@dataclass(frozen=True)
class S3Options:
    """How to reach S3 when the caller knows better than boto3's default chain (an Airflow
    connection, say). Unset fields fall back to that chain (``AWS_*`` env vars, profiles)."""

    endpoint_url: str | None = None
    region_name: str | None = None
    aws_access_key_id: str | None = field(default=None, repr=False)
    aws_secret_access_key: str | None = field(default=None, repr=False)
    aws_session_token: str | None = field(default=None, repr=False)

    def client_kwargs(self) -> dict[str, str]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v}


class S3Store:
    """An S3 bucket prefix through boto3; the endpoint and credentials come from ``options``,
    else from the standard AWS configuration (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ...).

    A single PUT is atomic in S3: an object is visible whole or not at all. The object's sha256
    travels in its user metadata, set by the same PUT.
    """

    parallel_writes = 32  # each PUT mostly waits on the network

    def __init__(self, bucket: str, prefix: str = "", options: S3Options | None = None) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise UserError("An s3:// store needs boto3: pip install 'sim-pipeline[s3]'.") from None
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.options = options or S3Options()
        # A session of its own reads the configuration now, not when the process first used boto3.
        # The fetch stage writes from many threads; boto3 clients are thread-safe.
        self.client = boto3.session.Session().client(
            "s3", config=Config(max_pool_connections=64), **self.options.client_kwargs())
        self._call("head_bucket", Bucket=bucket)

    def __reduce__(self) -> tuple[type, tuple[str, str, S3Options]]:
        """Picklable (for fetch processes): a process makes its own client."""
        return S3Store, (self.bucket, self.prefix, self.options)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, operation: str, **kwargs: Any) -> Any:
        """One boto3 call; problems the user must fix become a ``UserError`` naming the fix."""
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = f"s3://{self.bucket} at {self.client.meta.endpoint_url}"
        try:
            return getattr(self.client, operation)(**kwargs)
        except NoCredentialsError:
            raise UserError(f"No AWS credentials for {where}: set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE.") from None
        except EndpointConnectionError:
            raise UserError(f"Cannot reach the S3 endpoint for {where}: check "
                            "AWS_ENDPOINT_URL.") from None
        except ClientError as error:
            code = _error_code(error)
            if code in _MISSING_BUCKET or (operation == "head_bucket" and code in _NOT_FOUND):
                raise UserError(f"Bucket {self.bucket!r} does not exist at "
                                f"{self.client.meta.endpoint_url}: create it first.") from None
            if code in _REFUSED:
                raise UserError(f"S3 refused the credentials for {where} ({code}): check "
                                "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the bucket's "
                                "permissions.") from None
            raise

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._call("head_object", Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if _error_code(error) in _NOT_FOUND:
                return False
            raise
        return True

    def read_bytes(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            response = self._call("get_object", Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if _error_code(error) in _NOT_FOUND:
                raise MissingObject(key) from None
            raise
        data = response["Body"].read()
        if len(data) != response["ContentLength"]:
            raise IntegrityError(f"{self.uri(key)} came back short: {len(data)} of "
                                 f"{response['ContentLength']} bytes; rerun.")
        return _check_digest(self.uri(key), data, response.get("Metadata", {}).get("sha256"))

    def write_bytes(self, key: str, data: bytes, sha256: str | None = None) -> None:
        self._call("put_object", Bucket=self.bucket, Key=self._key(key), Body=data,
                   Metadata={"sha256": sha256 or sha256_bytes(data)})

    def create_bytes(self, key: str, data: bytes, sha256: str | None = None) -> bool:
        """A conditional PUT (If-None-Match: *): the first writer wins, the others get False."""
        from botocore.exceptions import ClientError

        try:
            self._call("put_object", Bucket=self.bucket, Key=self._key(key), Body=data,
                       Metadata={"sha256": sha256 or sha256_bytes(data)}, IfNoneMatch="*")
        except ClientError as error:
            if _error_code(error) in _LOST_RACE:
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self._call("delete_object", Bucket=self.bucket, Key=self._key(key))

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Every key (under ``prefix``), in S3's (sorted) order."""
        start = len(self._key(""))
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(prefix))
        for page in pages:
            for item in page.get("Contents", []):
                yield item["Key"][start:]

    def stale_temporaries(self) -> Iterator[str]:
        """None: a PUT is whole or absent, so S3 holds no temporaries."""
        return iter(())

    def remove_temporary(self, location: str) -> None:
        raise ValueError(f"S3 holds no temporary objects: {location}")

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


def _error_code(error: Exception) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


def open_store(location: str, s3: S3Options | None = None) -> ObjectStore:
    """``s3://bucket/prefix`` (reached through ``s3``, if given) or a local folder path."""
    parsed = urlparse(location)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise UserError(f"SIM_PIPELINE_STORE={location!r} names no bucket.")
        return S3Store(parsed.netloc, parsed.path, s3)
    if parsed.scheme not in ("", "file"):
        raise UserError(f"SIM_PIPELINE_STORE={location!r}: use a folder path or s3://bucket/prefix.")
    return LocalStore(parsed.path if parsed.scheme == "file" else location)
