#!/usr/bin/env python
"""Regenerate docs/CONFIG.md from the configuration schema.

    python tools/gen_config_docs.py            # write docs/CONFIG.md
    python tools/gen_config_docs.py --check    # exit 1 if docs/CONFIG.md is out of date
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
try:
    import megaq  # noqa: F401
except ImportError:  # a checkout that was not pip-installed
    sys.path.insert(0, str(ROOT))

from megaq.training.config_docs import render_config_docs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "docs" / "CONFIG.md"))
    parser.add_argument("--check", action="store_true", help="only check that the file is up to date")
    args = parser.parse_args(argv)
    text = render_config_docs()
    out = Path(args.output)
    if args.check:
        if not out.is_file() or out.read_text(encoding="utf-8") != text:
            print(f"{out} is out of date: run python tools/gen_config_docs.py", file=sys.stderr)
            return 1
        print(f"{out} is up to date")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
