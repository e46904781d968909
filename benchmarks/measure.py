"""Run one measurement in this process: ``python measure.py MODULE:FUNCTION KWARGS_JSON OUTPUT``.

Started by :mod:`harness` for every measurement. Calls the function with the keyword arguments and
writes ``{"status": ..., "sample": ...}`` as JSON to OUTPUT (not stdout, where libraries print).
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback
from pathlib import Path

from harness import NotInstalled


def main(argv: list[str]) -> int:
    target, kwargs_json, output = argv
    module_name, _, function_name = target.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    try:
        report = {"status": "ok", "sample": function(**json.loads(kwargs_json))}
    except NotInstalled as exc:
        report = {"status": "not installed", "detail": str(exc)}
    except Exception as exc:
        traceback.print_exc()
        report = {"status": "error", "detail": f"{type(exc).__name__}: {exc}"}
    Path(output).write_text(json.dumps(report))
    return 0 if report["status"] != "error" else 1


# Pools that spawn workers re-import the main module; only the parent may measure.
if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
