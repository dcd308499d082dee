#!/usr/bin/env python3
"""img2img with sdlite. Run `python scripts/img2img.py --help` for the flags."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sdlite.cli import img2img_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(img2img_main())
