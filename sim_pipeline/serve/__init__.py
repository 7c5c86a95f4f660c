"""``sim-pipeline serve``: the pipeline's fetch, decode, embed and score steps as an online service.

One long-lived process holds the model and shares the object store, the embedding cache and the
results database with the batch pipeline. ``sim_pipeline.stages.embed.remote``
is the client that talks to it without importing torch.
"""
