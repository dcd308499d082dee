"""Session set-up shared by every test module."""

import os
import shutil
import tempfile


def pytest_configure(config):
    # sdlite's CPU attention kernel (sdlite/cpu_kernels.py) is built on first use into a cache
    # folder: the tests build it into a folder of their own, not the user's ~/.cache, and so prove
    # that a fresh machine builds it.
    if "SDLITE_CACHE_DIR" not in os.environ:
        config._sdlite_cache = os.environ["SDLITE_CACHE_DIR"] = tempfile.mkdtemp(prefix="sdlite-test-cache-")


def pytest_unconfigure(config):
    cache = getattr(config, "_sdlite_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
        del os.environ["SDLITE_CACHE_DIR"]
