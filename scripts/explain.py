#!/usr/bin/env python3
"""Draw the figures of docs/how-it-works.md. Run `python scripts/explain.py --help` for the flags.

    python scripts/explain.py                       # bundled model → docs/figures/
    python scripts/explain.py --ckpt /tmp/smoke/m.safetensors --outdir /tmp/figs
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from sdlite.explain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_outdir=ROOT / "docs" / "figures"))
