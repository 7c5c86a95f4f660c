"""The launchers of this checkout, run from its root as modules: ``python -m bin.stack up``,
``python -m bin.airflow_local``. They import each other and ``plugins.sim_airflow.pools`` (the
slots table, free of imports) as packages, so nothing edits ``sys.path``."""
