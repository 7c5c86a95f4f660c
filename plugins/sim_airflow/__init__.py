"""Airflow glue for sim-pipeline: options, connections, task bodies' plumbing and GPU pods.

The pipeline's logic stays in ``sim_pipeline``; these modules only turn Airflow's world (params,
Variables, Connections, pods) into the library's ``Settings`` and stage calls. ``options`` is what
the DAG file imports at parse time, so it must stay cheap: no ``sim_pipeline``, no torch.
"""
