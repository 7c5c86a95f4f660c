"""Calling a running ``sim-pipeline serve`` from a pipeline task: vectors without torch.

An embed task that hands its chunk to the service sends store keys (the service shares the object
store) and captions, never image bytes, and gets back the same unit vectors the in-process path
computes, with the same decode error codes. The service looks up and fills the embedding cache
itself, under the tag of the precision *it* runs, so the task neither loads the model nor needs to
know the service's device. Only httpx and numpy are imported here.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx
import numpy as np

from sim_pipeline.core.errors import UserError
from sim_pipeline.core.layout import image_key
from sim_pipeline.core.streams import batched

GROUP = 256  # items per request: the service's default --max-items
RETRIES = 6
MAX_WAIT_S = 30.0


class InferenceUnavailable(UserError):
    """The service did not answer, or stayed at capacity, through every retry."""


class InferenceClient:
    """A connection to one service (or its load balancer); use as a context manager."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 timeout: float = 600.0, group: int = GROUP, retries: int = RETRIES) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url, self.model, self.group, self.retries = base_url, model, group, retries
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout,
                                 trust_env=False)

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.http.close()

    def image_vectors(self, keys: Sequence[str]) -> list[np.ndarray | str]:
        """One unit vector, or the decode error code, per store key of a fetched image."""
        out: list[np.ndarray | str] = []
        for group in batched(keys, self.group):
            part = [{"key": k} for k in group]
            out += self._embed("/v1/embed/images", {"images": part, "encoding": "base64"})
        return out

    def text_vectors(self, texts: Sequence[str]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for part in batched(texts, self.group):
            found = self._embed("/v1/embed/texts", {"texts": part, "encoding": "base64"})
            out += [v for v in found if not isinstance(v, str)]
        return out

    def _embed(self, path: str, payload: dict[str, Any]) -> list[np.ndarray | str]:
        answer = self._post(path, payload)
        if answer["model"] != self.model:
            raise UserError(f"The inference service at {self.base_url} serves {answer['model']}, "
                            f"but this run uses {self.model}: point it at the same model.")
        return [e["error"] if e["error"] else
                np.frombuffer(base64.b64decode(e["vector_base64"]), dtype="<f4")
                for e in answer["embeddings"]]

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST with retries on connection failures and 503 (honouring Retry-After)."""
        problem = "no answer"
        for attempt in range(self.retries + 1):
            try:
                response = self.http.post(path, json=payload)
            except httpx.TransportError as error:
                problem, wait = f"{type(error).__name__}: {error}", min(MAX_WAIT_S, 2.0**attempt)
            else:
                if response.status_code != 503:
                    return _checked(response, self.base_url)
                problem = _detail(response)
                wait = min(MAX_WAIT_S, float(response.headers.get("retry-after", 2.0**attempt)))
            if attempt < self.retries:
                time.sleep(wait)
        raise InferenceUnavailable(f"The inference service at {self.base_url} is unavailable "
                                   f"after {self.retries + 1} tries ({problem}).")


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json()["detail"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


def _checked(response: httpx.Response, base_url: str) -> dict[str, Any]:
    if response.status_code != 200:
        raise UserError(f"The inference service at {base_url} refused the request "
                        f"(HTTP {response.status_code}): {_detail(response)}")
    return response.json()


def remote_image_vectors(client: InferenceClient, url_hash_by_sha: Mapping[str, str]) -> tuple[
        dict[str, np.ndarray], dict[str, str]]:
    """``({sha: vector}, {sha: decode error})`` for the fetched images ``{sha: url_hash}``: the
    shape embed-images needs to assemble its chunk output."""
    shas = list(url_hash_by_sha)
    found = client.image_vectors([image_key(url_hash_by_sha[s]) for s in shas])
    vectors = {s: v for s, v in zip(shas, found, strict=True) if not isinstance(v, str)}
    failed = {s: v for s, v in zip(shas, found, strict=True) if isinstance(v, str)}
    return vectors, failed


def remote_text_vectors(client: InferenceClient, captions: Mapping[str, str]) -> dict[
        str, np.ndarray]:
    """``{caption hash: vector}`` for ``{caption hash: caption}``: embed-texts' shape."""
    hashes = list(captions)
    return dict(zip(hashes, client.text_vectors([captions[h] for h in hashes]), strict=True))
