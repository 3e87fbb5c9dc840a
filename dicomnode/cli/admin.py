"""The operator's commands on a node, running or not: studies, status, retry, purge, audit, db, echo.

Apart from :mod:`dicomnode.cli.node` (the commands that run the node's processes) because these
read or change what the node holds (its database, its spool, its audit trail) or check a peer, and
none of them starts anything. They open an existing database only (:func:`existing_database`):
before the first ``serve`` they fail with what to do instead of creating one.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode.cli._output import EXIT_FAILURE, EXIT_OK, print_json
from dicomnode.config import Config
from dicomnode.errors import DicomNodeError

if TYPE_CHECKING:
    from dicomnode.node.services import Services


@contextlib.contextmanager
def existing_database(config: Config) -> Iterator[Services]:
    """The node's services for a read or an operator's change; fails with what to do when the
    database was never created (nothing is created here)."""
    from dicomnode.node.services import open_services

    _require_database(config)
    services = open_services(config, upgrade=False)
    try:
        yield services
    finally:
        services.close()


def _require_database(config: Config) -> None:
    """Fail with what to do when the database was never created (``status`` before the first ``serve``)."""
    from sqlalchemy import inspect
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from dicomnode.node.services import database_engine

    url = make_url(config.storage.database_url)
    shown = url.render_as_string(hide_password=True)
    hint = "start the node once with `dicomnode serve` or run `dicomnode db upgrade`"
    is_file = url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:"
    if is_file and not Path(str(url.database)).exists():
        raise DicomNodeError(f"no database yet at {url.database}; {hint}")
    engine = database_engine(config)
    try:
        migrated = inspect(engine).has_table("alembic_version")
    except SQLAlchemyError as exc:
        raise DicomNodeError(f"cannot open the database at {shown}: {type(exc).__name__}") from exc
    finally:
        engine.dispose()
    if not migrated:
        raise DicomNodeError(f"no database yet at {shown} (it has no tables); {hint}")


def cmd_audit(config: Config, args: argparse.Namespace) -> int:
    from dicomnode.audit import audit_path, read_messages
    from dicomnode.audit.messages import summary

    try:
        since = _since(args.since) if args.since else None
    except ValueError:
        print(
            f"--since {args.since!r}: give an ISO date/time or a duration like 30m, 12h, 7d", file=sys.stderr
        )
        return EXIT_FAILURE
    entries = [summary(message) for message in read_messages(audit_path(config), since)]
    if args.json:
        print_json(entries)
        return EXIT_OK
    for entry in entries:
        who = " -> ".join(f"{p['ae_title']}@{p['address']}" for p in entry["participants"])  # type: ignore[attr-defined]
        what = entry["type"] or entry["event"]
        studies = ",".join(entry["studies"])  # type: ignore[arg-type]
        print(f"{entry['time']}  {what:<28} {entry['action']} outcome {entry['outcome']}  {who}  {studies}")
        if entry["description"]:
            print(f"    {entry['description']}")
    return EXIT_OK


def _since(text: str) -> datetime:
    """``2026-12-01``, ``2026-12-01T10:00Z`` or a duration back from now (``30m``, ``12h``, ``7d``)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].isdigit():
        return datetime.now(UTC) - timedelta(seconds=int(text[:-1]) * units[text[-1]])
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def cmd_purge(config: Config, args: argparse.Namespace) -> int:
    from dicomnode import audit
    from dicomnode.node.retention import candidates, purge

    with existing_database(config) as services:
        chosen = candidates(services)
        for candidate in chosen:
            print(
                f"{'would delete' if args.dry_run else 'deleting'} {candidate.study_instance_uid}  "
                f"{candidate.instances} instances, {candidate.size_bytes / 1e6:.1f} MB, last received "
                f"{candidate.last_received_at.isoformat(timespec='seconds')}: {candidate.reason}"
            )
        if args.dry_run:
            print(f"{len(chosen)} studies would be deleted (dry run: nothing deleted)")
            return EXIT_OK
        audit.configure(config)
        try:
            deleted = purge(services, chosen)
        finally:
            audit.shutdown()
    print(f"deleted {deleted} studies")
    return EXIT_OK


def cmd_studies(config: Config, args: argparse.Namespace) -> int:
    from dicomnode.node.inventory import list_studies

    with existing_database(config) as services:
        studies = list_studies(services.sessions, config.storage.path)
    if args.json:
        print_json(studies)
        return EXIT_OK
    if not studies:
        print("no studies")
        return EXIT_OK
    print(f"{'study instance uid':<64}  {'state':<12} {'instances':>9}  last received")
    for study in studies:
        print(
            f"{study['study_instance_uid']:<64}  {study['state']:<12} {len(study['instances']):>9}  "
            f"{study['last_received_at']}"
        )
    return EXIT_OK


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    from dicomnode.node.inventory import node_status

    with existing_database(config) as services:
        status = node_status(services.sessions, config)
    if args.json:
        print_json(status)
        return EXIT_OK
    listener = status["listener"]
    print(f"listener: {listener['ae_title']} on {listener['host']}:{listener['port']}")
    print(f"studies: {status['studies']}  instances: {status['instances']}")
    print("jobs: " + ", ".join(f"{k} {v}" for k, v in status["jobs"].items()))
    if status["running_on"]:
        print("running on: " + ", ".join(f"{owner} {n}" for owner, n in status["running_on"].items()))
    print("deliveries: " + ", ".join(f"{k} {v}" for k, v in status["deliveries"].items()))
    for name, entry in status["deliveries_by_destination"].items():
        counts = ", ".join(f"{k} {v}" for k, v in entry["counts"].items())
        reason = f"; last error: {entry['last_error']}" if entry["last_error"] else ""
        print(f"  {name}: {counts}{reason}")
    disk = status["disk"]
    print(
        f"disk: {disk['used_bytes'] / 1e6:.1f} MB stored, {disk['free_bytes'] / 1e9:.1f} GB free "
        f"(floor {config.node.min_free_disk_mb} MB)"
    )
    return EXIT_OK


def cmd_echo(config: Config, args: argparse.Namespace) -> int:
    """C-ECHO a peer with the node's identity (the sender's AE); a rejection is named, with its reason."""
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from dicomnode.deliver.scu import RejectionWitness, make_ae

    where = f"{args.ae_title}@{args.host}:{args.port}"
    ae = make_ae(args.calling_ae or config.node.ae_title, args.timeout)
    ae.add_requested_context(Verification)
    witness = RejectionWitness()
    assoc = ae.associate(args.host, args.port, ae_title=args.ae_title, evt_handlers=[*witness.evt_handlers])
    if not assoc.is_established:
        rejection = witness.rejection_of(assoc)
        why = (
            f"rejected ({rejection.result_str}, source {rejection.source_str}, reason {rejection.reason_str})"
            if rejection is not None
            else "failed (connection refused, unreachable, aborted or no answer in time)"
        )
        print(f"C-ECHO to {where}: association {why}", file=sys.stderr)
        return EXIT_FAILURE
    status = assoc.send_c_echo()
    assoc.release()
    code = getattr(status, "Status", None)
    if code == 0:
        print(f"C-ECHO to {where}: success")
        return EXIT_OK
    print(f"C-ECHO to {where}: status {code!r}", file=sys.stderr)
    return EXIT_FAILURE


def cmd_db(config: Config, args: argparse.Namespace) -> int:
    from dicomnode import migrate
    from dicomnode.node.services import database_engine

    engine = database_engine(config)
    try:
        if args.action == "copy":
            return _copy_database(engine, args)
        if args.action == "upgrade":
            migrate.upgrade(engine, args.revision or "head")
        elif args.action == "downgrade":
            migrate.downgrade(engine, args.revision or "base")
        else:
            migrate.check(engine)
    finally:
        engine.dispose()
    print(f"database {args.action}: done")
    return EXIT_OK


def _copy_database(source: Any, args: argparse.Namespace) -> int:
    from dicomnode.db import make_engine
    from dicomnode.node.dbcopy import copy_database

    if not args.to:
        print("db copy needs --to URL (the empty target database)", file=sys.stderr)
        return EXIT_FAILURE
    target = make_engine(args.to)
    try:
        report = copy_database(source, target)
    finally:
        target.dispose()
    rows = ", ".join(f"{count} {table}" for table, count in report.rows.items())
    print(f"database copied ({rows}); now set storage.database_url to the target and start the node")
    return EXIT_OK


def cmd_retry(config: Config, args: argparse.Namespace) -> int:
    from dicomnode.node.inventory import retry

    with existing_database(config) as services:
        jobs, deliveries = retry(services, args.target)
    print(f"requeued {jobs} failed jobs and {deliveries} deliveries for {args.target}")
    return EXIT_OK if jobs or deliveries else EXIT_FAILURE


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register the operator's subcommands on the main parser (after the node's own)."""
    p = sub.add_parser("audit", parents=[common], help="print the PS3.15 audit trail (UIDs only)")
    p.add_argument("--since", help="from this ISO date/time, or a duration back from now: 30m, 12h, 7d")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser(
        "purge", parents=[common], help="apply [retention] now: delete delivered studies past the limits"
    )
    p.add_argument("--dry-run", action="store_true", help="only show what would be deleted")
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser("studies", parents=[common], help="list the studies held, newest first")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_studies)

    p = sub.add_parser("status", parents=[common], help="counts by state, disk use, listener address")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("echo", parents=[common], help="C-ECHO a DICOM peer")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("ae_title", help="the peer's (called) AE title")
    p.add_argument("--calling-ae", help="our AE title (default node.ae_title)")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("db", parents=[common], help="database migrations, and copying to another database")
    p.add_argument("action", choices=["upgrade", "downgrade", "check", "copy"])
    p.add_argument("revision", nargs="?", help="for upgrade/downgrade (default head/base)")
    p.add_argument("--to", help="db copy: the target database URL (e.g. postgresql+psycopg://node@db/node)")
    p.set_defaults(func=cmd_db)

    p = sub.add_parser(
        "retry", parents=[common], help="send again / rerun what failed for a job id or a study instance uid"
    )
    p.add_argument("target", help="job id (a number) or Study Instance UID")
    p.set_defaults(func=cmd_retry)
