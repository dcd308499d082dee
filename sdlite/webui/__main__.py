"""``python -m sdlite.webui``: serve the web UI and the A1111-compatible API."""

import sys

from .server import main

sys.exit(main())
