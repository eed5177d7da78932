"""Child process for the registry crash-consistency tests.

Runs one registry operation against a home directory, on the database and artifact store the environment names
(ADAPTSERVE_DATABASE_URL, ADAPTSERVE_ARTIFACTS_URL, AWS_*: the parent's). The parent sets
ADAPTSERVE_REGISTRY_CRASH_AT so that the registry SIGKILLs this process at a chosen phase; without it the operation
completes and the result is printed.

Usage: python registry_crash_helper.py HOME register NAME SRC_DIR
       python registry_crash_helper.py HOME {promote,delete} NAME VERSION
       python registry_crash_helper.py HOME rollback NAME
       python registry_crash_helper.py HOME open          (opening imports a legacy registry.db)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.registry import Registry  # noqa: E402 - needs the sys.path entry above


def main(argv: list[str]) -> int:
    home, op, *rest = argv
    registry = Registry(home)
    if op == "open":
        print(registry.generation())
    elif op == "register":
        print(registry.register(rest[0], rest[1]).version)
    elif op == "promote":
        print(registry.promote(rest[0], int(rest[1])).version)
    elif op == "rollback":
        print(registry.rollback(rest[0]).version)
    elif op == "delete":
        registry.delete(rest[0], int(rest[1]))
    else:
        raise SystemExit(f"unknown op {op!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
