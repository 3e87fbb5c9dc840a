"""``dicomnode db copy``: move a node's database to another engine (SQLite -> PostgreSQL).

Every table of the schema is copied row by row, ids included, in foreign-key order, into a target
migrated to the same revision that holds no rows yet; on PostgreSQL the id sequences are then set
past the copied ids so new rows never collide. The source is only read. Run it with the node
stopped (``serve`` not running), then point ``storage.database_url`` at the target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import func, insert, select, text
from sqlalchemy.engine import Engine

from dicomnode import migrate
from dicomnode.db import Base
from dicomnode.errors import ConfigurationError

logger = logging.getLogger(__name__)

BATCH_ROWS = 1000


@dataclass(frozen=True)
class CopyReport:
    """Rows copied per table, in the order they were copied."""

    rows: dict[str, int]


def copy_database(source: Engine, target: Engine) -> CopyReport:
    """Copy every row of ``source`` into ``target`` (migrated here to the newest revision first).

    Refuses a target that already holds rows, or a source that is not at the newest revision,
    naming what to do instead.
    """
    try:
        migrate.check(source)
    except Exception as exc:
        raise ConfigurationError(
            "storage.database_url",
            f"the source database is not at the newest schema ({exc}); "
            "run `dicomnode db upgrade` on it first",
        ) from exc
    migrate.upgrade(target)
    tables = Base.metadata.sorted_tables  # parents before children
    with target.connect() as connection:
        for table in tables:
            if connection.execute(select(func.count()).select_from(table)).scalar_one():
                raise ConfigurationError(
                    "target",
                    f"table {table.name} of the target database is not empty; copy into an empty one",
                )
    copied: dict[str, int] = {}
    with source.connect() as reader, target.begin() as writer:
        for table in tables:
            count = 0
            result = reader.execution_options(stream_results=True).execute(
                select(table).order_by(*table.primary_key.columns)
            )
            while rows := result.fetchmany(BATCH_ROWS):
                writer.execute(insert(table), [dict(row._mapping) for row in rows])
                count += len(rows)
            copied[table.name] = count
            logger.info("copied %d rows of %s", count, table.name)
        if writer.dialect.name == "postgresql":
            for table in tables:
                for column in table.primary_key.columns:
                    if column.autoincrement is not False and column.type.python_type is int:
                        writer.execute(
                            text(
                                "SELECT setval(pg_get_serial_sequence(:table, :column), "
                                f"COALESCE((SELECT MAX({column.name}) FROM {table.name}), 0) + 1, false)"
                            ),
                            {"table": table.name, "column": column.name},
                        )
    return CopyReport(rows=copied)
