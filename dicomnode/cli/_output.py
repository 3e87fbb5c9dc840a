"""What every command shares: exit codes and JSON output."""

from __future__ import annotations

import json
import sys
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def print_json(value: Any) -> None:
    """Pretty JSON on stdout (dates and paths as strings)."""
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
