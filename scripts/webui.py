"""Serve the sdlite web UI and its AUTOMATIC1111-compatible API: ``python scripts/webui.py [--port 7860]``.

The same as ``python -m sdlite.webui``; see ``--help``.
"""

import sys

from sdlite.webui import main

if __name__ == "__main__":
    sys.exit(main())
