"""The pools the DAG's tasks run in; they must exist for the scheduler to run those tasks.

Kept free of imports so the local launcher can create them without importing Airflow.
"""

GPU_POOL = "gpu"
FETCH_POOL = "image_fetch"
POOLS = {GPU_POOL: (1, "Concurrent CLIP inference tasks (embed_images, embed_texts)"),
         FETCH_POOL: (4, "Concurrent image download tasks (fetch_images)")}
