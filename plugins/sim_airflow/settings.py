"""Airflow Connections and run params into the library's ``Settings``; env vars as the fallback.

The results database comes from the postgres connection ``sim_pipeline_results``; S3 credentials and
endpoint for the store and for s3:// inputs come from the aws connection ``sim_pipeline_store``.
When a connection is not defined, the ``SIM_PIPELINE_*`` env vars (and boto3's usual AWS chain)
apply unchanged, so the same worker image runs with or without Airflow-managed secrets.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from airflow.sdk import Connection
from airflow.sdk.exceptions import AirflowNotFoundException

from sim_airflow.options import results_conn_id, store_conn_id

if TYPE_CHECKING:
    from sim_pipeline.config import Settings

# libpq options worth carrying from a postgres connection's extras into the URL.
LIBPQ_EXTRAS = ("sslmode", "sslcert", "sslkey", "sslrootcert", "connect_timeout",
                "application_name", "options", "target_session_attrs")


def find_connection(conn_id: str) -> Connection | None:
    """The connection, or None when it is not defined (then the env-var fallback applies)."""
    try:
        return Connection.get(conn_id)
    except AirflowNotFoundException:
        return None


def postgres_url(conn: Connection) -> str:
    """A psycopg 3 SQLAlchemy URL for a postgres connection (the schema field is the database)."""
    import sqlalchemy as sa

    if conn.conn_type not in ("postgres", "postgresql"):
        raise ValueError(f"Connection {conn.conn_id} is of type {conn.conn_type!r}; the results "
                         "database connection must be a postgres connection.")
    extras = conn.extra_dejson
    url = sa.URL.create("postgresql+psycopg", username=conn.login or None,
                        password=conn.password or None, host=conn.host or None,
                        port=conn.port or None, database=conn.schema or None,
                        query={k: str(extras[k]) for k in LIBPQ_EXTRAS if k in extras})
    return url.render_as_string(hide_password=False)


def results_database_url() -> str | None:
    conn = find_connection(results_conn_id())
    return None if conn is None else postgres_url(conn)


def aws_environment(conn_id: str) -> dict[str, str]:
    """The aws connection as the standard AWS env vars that boto3 (the library's S3 store) reads."""
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    hook = AwsBaseHook(aws_conn_id=conn_id, client_type="s3")
    credentials = hook.get_credentials()
    env = {"AWS_ACCESS_KEY_ID": credentials.access_key,
           "AWS_SECRET_ACCESS_KEY": credentials.secret_key,
           "AWS_SESSION_TOKEN": credentials.token,
           "AWS_DEFAULT_REGION": hook.conn_region_name,
           "AWS_ENDPOINT_URL_S3": hook.conn_config.get_service_endpoint_url("s3")}
    return {k: v for k, v in env.items() if v}


@contextmanager
def patched_environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set env vars for one stage, then restore them: dag.test runs every task in one process."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextmanager
def store_credentials() -> Iterator[None]:
    """Expose the aws connection, when defined, to the library's boto3 clients."""
    conn_id = store_conn_id()
    env = aws_environment(conn_id) if find_connection(conn_id) else {}
    with patched_environ(env):
        yield


def s3_conn_id() -> str | None:
    """For the amazon provider's hooks: our connection if defined, else boto3's default chain."""
    conn_id = store_conn_id()
    return conn_id if find_connection(conn_id) else None


def task_settings(params: Mapping[str, Any], **overrides: Any) -> Settings:
    """Run params and connections over the ``SIM_PIPELINE_*`` env vars (None means: not given)."""
    from sim_pipeline.config import load_settings

    values = {"model": params.get("model"), "chunk_size": params.get("chunk_size"),
              "database_url": results_database_url(), **overrides}
    return load_settings(values)
