"""The ``spark`` subcommand's flags; everything heavy (pyspark, the stages) loads when it runs."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction, flags: argparse.ArgumentParser) -> None:
    """The ``spark`` subcommand; pyspark is imported only when it runs."""
    spark = commands.add_parser("spark", parents=[flags],
                                help="score a CSV or parquet input on a Spark cluster")
    spark.add_argument("input", help="CSV, TSV or parquet; a local path or s3://")
    spark.add_argument("output", help="parquet (a folder), or a scored CSV when it ends in .csv")
    spark.add_argument("--master", help="Spark master URL; default: spark-submit's, else local")
    spark.add_argument("--run-id", help="the run's name in the store and the results table "
                       "(also SIM_PIPELINE_RUN_ID; default: derived from the input and model)")
    spark.add_argument("--record", action="store_true",
                       help="upsert every row into the results table (from the executors)")
    spark.set_defaults(handler=cmd_spark)


def cmd_spark(args: argparse.Namespace) -> int:
    from sim_pipeline.cli import settings_from
    from sim_pipeline.core.config import run_id_given
    from sim_pipeline.runners.lifecycle import check_model_folder
    from sim_pipeline.spark.job import check_local_input, run_spark_job
    from sim_pipeline.spark.session import class_archives, spark_session, stop_session

    settings = settings_from(args)
    check_local_input(args.input)
    if not settings.inference_url:  # a model folder that is not there: before Spark starts
        check_model_folder(settings.model)
    archives = class_archives(args.master or "", settings.jvm_archives)
    spark = spark_session(args.master, archives=archives)
    try:
        summary = run_spark_job(spark, args.input, args.output, settings, record=args.record,
                                run_id=run_id_given(args.run_id))
    finally:  # the application ends with the command, not in the JVM's exit behind the prompt
        stop_session(spark, archives)
    print(summary.render())
    return 0
