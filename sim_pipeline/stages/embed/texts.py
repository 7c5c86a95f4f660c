"""Stage 4, embed-texts: one unit vector per distinct caption of a chunk.

Needs nothing from the fetch stage. Captions already in the embedding cache cost no inference;
the rest are sorted by length so a batch's captions pad to similar lengths.
"""

from __future__ import annotations

import numpy as np

from sim_pipeline.core.config import Settings
from sim_pipeline.core.layout import ChunkRef, model_tag
from sim_pipeline.core.store import ObjectStore
from sim_pipeline.core.streams import batched
from sim_pipeline.stages.embed.encoders import encoder_for, remote_encoder, vector_tag
from sim_pipeline.stages.embed.remote import remote_text_vectors
from sim_pipeline.stages.embed.sets import (
    EmbedStats,
    assemble,
    save_embedding_set,
    set_is_whole,
)
from sim_pipeline.stages.embed.vector_cache import VectorCache
from sim_pipeline.stages.known import previous_vectors, write_vectors
from sim_pipeline.stages.plan import read_chunk_table, scorable_keys


def embed_texts_chunk(chunk: ChunkRef, store: ObjectStore, settings: Settings) -> EmbedStats:
    """Embed every distinct caption of the chunk not already embedded."""
    key = chunk.text_embeddings_key(model_tag(settings.model, settings.variant))
    if set_is_whole(store, key, "text embeddings"):
        return EmbedStats(chunk_done_before=True)
    _, captions = scorable_keys(read_chunk_table(store, chunk))
    if settings.inference_url:
        with remote_encoder(settings) as client:
            vectors = remote_text_vectors(client, captions)
        todo = list(captions)
    else:
        earlier = previous_vectors(store, chunk, "texts", vector_tag(settings))
        vectors, todo = _local_text_vectors(captions, store, settings, earlier)
        write_vectors(store, chunk, "texts", vector_tag(settings), vectors, earlier,
                      settings.model)
    save_embedding_set(store, key, assemble(sorted(captions), vectors, {}), settings.model)
    return EmbedStats(len(todo), len(captions) - len(todo), 0)


def _local_text_vectors(captions: dict[str, str], store: ObjectStore, settings: Settings,
                        earlier: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Vectors from the previous chunk's index or the embedding cache, the rest from the
    model; and which were computed."""
    cache = VectorCache(store, vector_tag(settings), "texts")
    vectors = {h: earlier[h] for h in captions if h in earlier}
    vectors |= cache.get_many(h for h in captions if h not in vectors)
    # Similar lengths share a batch, so padding to the longest wastes little.
    todo = sorted((h for h in captions if h not in vectors), key=lambda h: (len(captions[h]), h))
    for batch in batched(todo, settings.batch_size):
        encoded = encoder_for(settings, "text").encode_texts([captions[h] for h in batch])
        new = dict(zip(batch, encoded, strict=True))
        cache.put_many(new)
        vectors.update(new)
    return vectors, todo
