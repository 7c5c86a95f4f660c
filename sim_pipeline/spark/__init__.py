"""Scoring on Spark: ``score_frame`` for DataFrames, ``sim-pipeline spark`` for files.

Importing this package needs no pyspark; calling into it does (the ``spark`` extra).
"""

from sim_pipeline.spark.frame import finish_run, score_frame

__all__ = ["finish_run", "score_frame"]
