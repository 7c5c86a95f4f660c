"""Airflow glue for sim-pipeline: options, connections, task bodies' plumbing and GPU pods.

The pipeline's logic stays in ``sim_pipeline``; these modules only turn Airflow's world (params,
Connections, pods) and the Airflow-side ``SIM_PIPELINE_*`` env vars (``options``) into the library's
``Settings`` and stage calls. ``options`` and ``tasks`` are what the DAG file imports at parse time,
so they must stay cheap: no ``sim_pipeline``, no torch, no metadata database or secrets lookups.
"""
