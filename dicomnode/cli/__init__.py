"""The ``dicomnode`` command line. The only place that configures logging.

Every command takes ``--config FILE`` (default ``./config.toml`` or ``$DICOMNODE_CONFIG``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from dicomnode.cli._output import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK
from dicomnode.config import load_config
from dicomnode.errors import ConfigurationError, DicomNodeError

logger = logging.getLogger("dicomnode")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
    )
    # pynetdicom logs every PDU at INFO; keep its routine chatter out of the operator's log.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    # pydicom's and other libraries' warnings can quote element values (a malformed birth date or
    # name); route them to logging and keep them out of the operator's log: no patient data in logs.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomnode", description="DICOM AI node for radiology")
    parser.add_argument("--config", help="configuration file (default ./config.toml or $DICOMNODE_CONFIG)")
    parser.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="override logging.level"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # --config is accepted after the subcommand too (`dicomnode serve --config FILE`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help="configuration file")
    common.add_argument(
        "--log-level", default=argparse.SUPPRESS, choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )

    from dicomnode.cli import admin, compare, lifecycle, models, node, ood

    node.add_commands(sub, common)
    admin.add_commands(sub, common)
    models.add_commands(sub, common)
    lifecycle.add_commands(sub, common)
    ood.add_commands(sub, common)
    compare.add_commands(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigurationError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(args.log_level or config.log_level)
    try:
        return int(args.func(config, args))
    except ConfigurationError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except DicomNodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
