"""Schema migrations with alembic, driven from the validated configuration."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy.engine import Engine

MIGRATIONS_PATH = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(engine: Engine) -> AlembicConfig:
    """An alembic configuration that runs on ``engine``'s connections."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_PATH))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    cfg.attributes["engine"] = engine
    return cfg


def _run(engine: Engine, action: str, revision: str | None = None) -> None:
    cfg = alembic_config(engine)
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        if action == "upgrade":
            command.upgrade(cfg, revision or "head")
        elif action == "downgrade":
            command.downgrade(cfg, revision or "base")
        elif action == "check":
            command.check(cfg)
        else:  # pragma: no cover - internal misuse
            raise ValueError(action)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (default: the newest)."""
    _run(engine, "upgrade", revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    """Take the schema back to ``revision`` (default: empty)."""
    _run(engine, "downgrade", revision)


def check(engine: Engine) -> None:
    """Raise when the models and the migrated schema differ (alembic ``check``)."""
    _run(engine, "check")
