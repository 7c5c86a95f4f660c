"""Row numbers for a DataFrame (the CLI's ``row_number``: each row's place in the input) and its
rows spread over the cluster in order, with as few Spark jobs as possible.

Each extra job costs seconds on a cold cluster, and one that runs Python code starts Python
workers of its own, so: a one-partition frame (one CSV file) is numbered by
``monotonically_increasing_id`` alone and counted by one JVM-only job; a frame of several
partitions adds each partition's first row number to it, from one JVM-only job counting rows per
partition. No join, no ``createDataFrame`` (a Python job), no ``repartitionByRange`` (a sampling
job): rows are sent to their partition by a key Spark hashes into it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

OFFSET_BITS = 33  # monotonically_increasing_id: partition index above, position below
SPARK_HASH_SEED = 42  # the seed of Spark's hash() and of its hash partitioning
KEY_COLUMN = "_sim_key"


def numbered(df: DataFrame, column: str) -> tuple[DataFrame, int]:
    """``df`` with each row's position (0, 1, ...) in ``column``, and the row count.

    A row's number depends only on its partition and its place there, so a retried task numbers
    its rows as the first attempt did.
    """
    from pyspark.sql import functions as F

    parts = df.rdd.getNumPartitions()
    place = F.monotonically_increasing_id().bitwiseAND(F.lit((1 << OFFSET_BITS) - 1))
    if parts <= 1:
        return df.withColumn(column, place), df.count()
    counts = dict(df.groupBy(F.spark_partition_id()).count().collect())
    starts, total = [], 0
    for part in range(parts):
        starts.append(total)
        total += counts.get(part, 0)
    start = F.element_at(F.array(*[F.lit(s) for s in starts]), F.spark_partition_id() + 1)
    return df.withColumn(column, start + place), total


def spread(df: DataFrame, column: str, total: int, parts: int) -> DataFrame:
    """The rows in ``parts`` runs of consecutive numbers (``column``), partition ``i`` holding
    the ``i``-th run in order: ``repartitionByRange``'s result, without its sampling job."""
    from pyspark.sql import functions as F

    keys = keys_landing_in(parts)
    run = (F.col(column) * F.lit(parts) / F.lit(total)).cast("int")
    key = F.element_at(F.array(*[F.lit(k) for k in keys]), run + 1)
    return df.withColumn(KEY_COLUMN, key).repartition(parts, KEY_COLUMN) \
        .sortWithinPartitions(column).drop(KEY_COLUMN)


def keys_landing_in(parts: int) -> list[int]:
    """For each partition ``0 .. parts-1``, the smallest int key that ``repartition(parts, key)``
    sends there: Spark puts a row in ``pmod(murmur3(key, 42), parts)``."""
    first: dict[int, int] = {}
    key = 0
    while len(first) < parts:
        first.setdefault(spark_hash_int(key) % parts, key)
        key += 1
    return [first[p] for p in range(parts)]


def spark_hash_int(value: int, seed: int = SPARK_HASH_SEED) -> int:
    """Spark's ``hash()`` of an int column (``Murmur3_x86_32.hashInt``), as a signed int."""
    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & 0xFFFFFFFF

    k1 = rotl((value * 0xCC9E2D51) & 0xFFFFFFFF, 15) * 0x1B873593 & 0xFFFFFFFF
    h1 = (rotl(seed ^ k1, 13) * 5 + 0xE6546B64) & 0xFFFFFFFF
    h1 ^= 4  # the input's length in bytes
    h1 = (h1 ^ (h1 >> 16)) * 0x85EBCA6B & 0xFFFFFFFF
    h1 = (h1 ^ (h1 >> 13)) * 0xC2B2AE35 & 0xFFFFFFFF
    h1 ^= h1 >> 16
    return h1 - (1 << 32) if h1 & 0x80000000 else h1
