"""The examples in sdlite's docstrings (``>>>`` lines) run and print what they show."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import sdlite

# Every module but the ``__main__`` ones, whose import runs a command.
MODULES = sorted(m.name for m in pkgutil.walk_packages(sdlite.__path__, "sdlite.") if not m.name.endswith("__main__"))


def test_every_module_is_listed():
    assert {"sdlite.schedulers.unipc", "sdlite.ops", "sdlite.webui.server"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (printed above)"
