"""Commands that run the node's processes: serve, worker, listen, sender, http.

The supervisor (``serve``) and the children it starts by these same commands; the operator's
commands that read or change what a node holds are :mod:`dicomnode.cli.admin`.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path
from typing import Any

from dicomnode.cli._output import EXIT_FAILURE
from dicomnode.config import Config

logger = logging.getLogger("dicomnode")


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    from dicomnode.node.serve import parse_roles, serve

    roles = parse_roles(args.roles)
    if "worker" in roles:
        _warn_missing_models(config)
    if "listener" in roles:
        _warn_open_to_everyone(config)
    try:
        return serve(
            config,
            port_file=Path(args.port_file) if args.port_file else None,
            log_level=args.log_level,
            roles=roles,
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(
                f"error: port {config.node.port} is in use (node.port in {_config_name(config)}); "
                "stop the other program or choose another port",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        if exc.errno == errno.EACCES and 0 < config.node.port < 1024:
            print(
                f"error: port {config.node.port} needs root (node.port in {_config_name(config)}); "
                "choose a port above 1023 (11112 is DICOM's registered one)",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        raise


def _config_name(config: Config) -> str:
    return str(config.source) if config.source is not None else "the embedded defaults"


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def _warn_open_to_everyone(config: Config) -> None:
    """One WARNING when any host may store to the node under any calling AE title (the defaults)."""
    host = config.node.host
    if config.node.allowed_calling_ae_titles or host in LOOPBACK_HOSTS or host.startswith("127."):
        return
    logger.warning(
        "node.allowed_calling_ae_titles is empty and node.host is %s: any program that reaches port %d "
        "may store images and receive nothing back but results; list the modalities' and the PACS's "
        "AE titles in node.allowed_calling_ae_titles (in %s), or bind node.host to 127.0.0.1",
        host,
        config.node.port,
        _config_name(config),
    )


def cmd_worker(config: Config, args: argparse.Namespace) -> int:
    from dicomnode.node.process import die_with_parent

    die_with_parent()  # before importing torch: a supervisor that died meanwhile leaves no orphan
    from dicomnode.sandbox import CpuPriority, apply_cpu_priority

    # before the heavy imports too, which compete with reception at start (run_worker applies it again)
    apply_cpu_priority(CpuPriority(config.worker.nice, config.worker.cpu_policy))
    from dicomnode.work.pipeline import run_worker

    return run_worker(config, burst=args.burst)


def cmd_listen(config: Config, args: argparse.Namespace) -> int:
    from dicomnode.node.process import die_with_parent

    die_with_parent()
    from dicomnode.node.serve import listen

    return listen(config, args.port)


def cmd_sender(config: Config, args: argparse.Namespace) -> int:
    from dicomnode.node.process import die_with_parent

    die_with_parent()
    from dicomnode.deliver.sender import run_sender

    return run_sender(config, burst=args.burst)


def cmd_http(config: Config, args: argparse.Namespace) -> int:
    from dicomnode.node.process import die_with_parent

    die_with_parent()
    from dicomnode.http.server import run_http

    return run_http(
        config,
        port_file=Path(args.port_file) if args.port_file else None,
        check_listener=not args.no_listener_check,
    )


def _warn_missing_models(config: Config) -> None:
    models_dir = config.models.path
    for route in config.routes:
        if not (models_dir / route.model / "model.toml").exists():
            logger.warning(
                "model %r (route %r) is not installed in %s; images it would read get no result. "
                "Install the default model with: dicomnode models install-default",
                route.model,
                route.name,
                models_dir,
            )


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register the node's subcommands on the main parser."""
    p = sub.add_parser("serve", parents=[common], help="run the listener, workers and sender until SIGTERM")
    p.add_argument("--port-file", help="write the bound port here (useful with node.port = 0)")
    p.add_argument(
        "--roles",
        default="listener,worker,sender,http",
        help="what this process runs, comma-separated (default all): listener, worker, sender, http",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "worker", parents=[common], help="run one inference worker (serve starts these itself)"
    )
    p.add_argument("--burst", action="store_true", help="drain the queue once and exit")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser(
        "listen", parents=[common], help="an extra listener on a shared port (serve starts these)"
    )
    p.add_argument("--port", type=int, required=True, help="the port the first listener bound")
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser("sender", parents=[common], help="run the result sender (serve starts it itself)")
    p.add_argument("--burst", action="store_true", help="deliver what is due once and exit")
    p.set_defaults(func=cmd_sender)

    p = sub.add_parser(
        "http", parents=[common], help="serve the dashboard, REST API and /metrics (serve starts it itself)"
    )
    p.add_argument("--port-file", help="write the bound port here (useful with http.port = 0)")
    p.add_argument(
        "--no-listener-check", action="store_true", help="/healthz ignores the listener (none runs here)"
    )
    p.set_defaults(func=cmd_http)
