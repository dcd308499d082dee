"""Serve the sdlite web UI and its AUTOMATIC1111-compatible API: ``python scripts/webui.py [--port 7860]``.

The same as ``python -m sdlite.webui``; see ``--help``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sdlite.webui import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
