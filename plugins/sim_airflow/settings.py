"""Airflow Connections and run params into the library's ``Settings``; env vars as the fallback.

The results database comes from the postgres connection ``sim_pipeline_results`` (its URL built by
the postgres provider's ``PostgresHook``); the S3 endpoint, region and credentials of the store
come from the aws connection ``sim_pipeline_store`` (through the amazon provider's ``AwsBaseHook``)
as the ``S3Options`` of the task's ``Settings``, which the library's S3 store is built from: nothing
is written to the environment. The connection ids are ``SIM_PIPELINE_RESULTS_CONN_ID`` and
``SIM_PIPELINE_STORE_CONN_ID`` (``sim_airflow.options``). When a connection is not defined, the
``SIM_PIPELINE_*`` env vars (and boto3's usual AWS chain) apply unchanged, so the same worker image
runs with or without Airflow-managed secrets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from airflow.sdk import Connection
from airflow.sdk.exceptions import AirflowNotFoundException

from sim_airflow.options import results_conn_id, store_conn_id

if TYPE_CHECKING:
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    from sim_pipeline.core.config import Settings
    from sim_pipeline.core.store import S3Options

# The library's results database speaks psycopg 3, whatever SQLAlchemy scheme the connection asks.
DRIVERNAME = "postgresql+psycopg"
# libpq options worth carrying from a postgres connection's extras into the URL (the provider's
# URL carries only the ``sqlalchemy_query`` extra; its own connections pass these to libpq).
LIBPQ_EXTRAS = ("sslmode", "sslcert", "sslkey", "sslrootcert", "connect_timeout",
                "application_name", "options", "target_session_attrs")


def find_connection(conn_id: str) -> Connection | None:
    """The connection, or None when it is not defined (then the env-var fallback applies)."""
    try:
        return Connection.get(conn_id)
    except AirflowNotFoundException:
        return None


def postgres_url(hook: PostgresHook) -> str:
    """The hook's SQLAlchemy URL with the psycopg 3 driver and the password, for the library."""
    conn = hook.connection
    if conn.conn_type not in ("postgres", "postgresql"):
        raise ValueError(f"Connection {conn.conn_id} is of type {conn.conn_type!r}; the results "
                         "database connection must be a postgres connection.")
    url = hook.sqlalchemy_url.set(drivername=DRIVERNAME)
    extras = conn.extra_dejson
    libpq = {k: str(extras[k]) for k in LIBPQ_EXTRAS if k in extras and k not in url.query}
    return url.update_query_dict(libpq).render_as_string(hide_password=False)


def results_database_url() -> str | None:
    """The results connection's URL, or None (then ``SIM_PIPELINE_DATABASE_URL`` applies)."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    conn = find_connection(results_conn_id())
    if conn is None:
        return None
    return postgres_url(PostgresHook(postgres_conn_id=conn.conn_id, connection=conn))


def s3_options(conn_id: str) -> S3Options:
    """The aws connection as the options the library's S3 store builds its boto3 client from."""
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    from sim_pipeline.core.store import S3Options

    hook = AwsBaseHook(aws_conn_id=conn_id, client_type="s3")
    credentials = hook.get_credentials()
    return S3Options(endpoint_url=hook.conn_config.get_service_endpoint_url("s3"),
                     region_name=hook.conn_region_name,
                     aws_access_key_id=credentials.access_key,
                     aws_secret_access_key=credentials.secret_key,
                     aws_session_token=credentials.token)


def store_options() -> S3Options | None:
    """The store connection's ``S3Options``, or None (then boto3's default chain applies)."""
    conn_id = s3_conn_id()
    return None if conn_id is None else s3_options(conn_id)


def s3_conn_id() -> str | None:
    """For the amazon provider's hooks: our connection if defined, else boto3's default chain."""
    conn_id = store_conn_id()
    return conn_id if find_connection(conn_id) else None


def task_settings(params: Mapping[str, Any], **overrides: Any) -> Settings:
    """Run params and connections over the ``SIM_PIPELINE_*`` env vars (None means: not given)."""
    from sim_pipeline.core.config import load_settings

    values = {"model": params.get("model"), "chunk_size": params.get("chunk_size"),
              "database_url": results_database_url(), "s3": store_options(), **overrides}
    return load_settings(values)
