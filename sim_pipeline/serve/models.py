"""The service's requests and responses; these are what ``/docs`` shows, field by field.

Unknown fields are refused (422), so a misspelt ``"recrod": true`` is an error, not a silent
default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Encoding = Literal["float", "base64"]
ENCODING_HELP = ("how vectors are written: 'float', a JSON list of numbers; 'base64', the "
                 "vector's little-endian float32 bytes in base64 (exact and 4x smaller)")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Pair(Strict):
    url: str = Field(description="http or https URL of the image; fetched with the batch "
                                 "pipeline's guard, limits and cache")
    caption: str = Field(description="the text to compare with the image; longer captions are "
                                     "truncated at the model's token limit")


class ScoreRequest(Strict):
    pairs: list[Pair] = Field(min_length=1, description="the pairs to score, answered in order")
    record: bool = Field(False, description="also write the rows to the results table, under "
                                            "the service's run id of the day (serve-YYYYMMDD)")


class PairResult(BaseModel):
    similarity: float | None = Field(description="(cosine + 1) / 2 rounded to 4 decimals; null "
                                                 "when the pair failed")
    cosine: float | None = Field(description="cosine of the two embeddings, rounded to 6 "
                                             "decimals; null when the pair failed")
    error: str | None = Field(description="the pipeline's error code (e.g. http_404, "
                                          "blocked_address, decode_error); null on success")


class ScoreResponse(BaseModel):
    model: str = Field(description="the checkpoint that scored the pairs")
    run_id: str | None = Field(description="the results-table run the rows went to; null "
                                           "unless record was true")
    results: list[PairResult] = Field(description="one result per pair, in request order")


class ImageInput(Strict):
    data: str | None = Field(None, description="the image file's bytes, base64-encoded")
    key: str | None = Field(None, description="an object-store key of a fetched image, "
                                              "images/<h[:2]>/<h> where h is the URL's sha256")

    @model_validator(mode="after")
    def _one_source(self) -> ImageInput:
        if (self.data is None) == (self.key is None):
            raise ValueError("give exactly one of data and key")
        return self


class EmbedImagesRequest(Strict):
    images: list[ImageInput] = Field(min_length=1, description="images to embed, in order")
    encoding: Encoding = Field("float", description=ENCODING_HELP)


class EmbedTextsRequest(Strict):
    texts: list[str] = Field(min_length=1, description="captions to embed, in order")
    encoding: Encoding = Field("float", description=ENCODING_HELP)


class Embedding(BaseModel):
    vector: list[float] | None = Field(None, description="the unit vector (encoding 'float')")
    vector_base64: str | None = Field(None, description="the unit vector as base64 "
                                                        "little-endian float32 (encoding 'base64')")
    error: str | None = Field(None, description="why there is no vector: the error code of the "
                                                "image's fetch or decode; null on success")


class EmbedResponse(BaseModel):
    model: str = Field(description="the checkpoint that produced the vectors")
    dimensions: int = Field(description="length of each vector")
    embeddings: list[Embedding] = Field(description="one per input, in request order")


class Health(BaseModel):
    status: Literal["ok"] = Field(description="the process is alive and serving HTTP")


class Readiness(BaseModel):
    ready: bool = Field(description="true when every check passed")
    model: str = Field(description="'loaded', 'loading', or why loading failed")
    store: str = Field(description="'ok', or why the object store cannot be reached")
    database: str = Field(description="'ok', or why the results database cannot be reached")


class Problem(BaseModel):
    detail: str = Field(description="what went wrong, in one sentence")
