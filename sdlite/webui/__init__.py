"""The sdlite web UI and an AUTOMATIC1111-compatible HTTP API (needs the ``webui`` extra: FastAPI, uvicorn).

    python -m sdlite.webui                      # the page and /sdapi/v1/... on http://127.0.0.1:7860

    >>> from sdlite.webui import create_app, ServerThread
    >>> with ServerThread(create_app("models/Stable-diffusion"), port=7861) as server:   # doctest: +SKIP
    ...     print(server.url)

See :mod:`sdlite.webui.server`.
"""

from .server import ServerThread, create_app, latent_preview, main

__all__ = ["create_app", "main", "ServerThread", "latent_preview"]
