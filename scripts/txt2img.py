#!/usr/bin/env python3
"""txt2img with sdlite. Run `python scripts/txt2img.py --help` for the flags."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sdlite.cli import txt2img_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(txt2img_main())
