"""The public API: every public name has a docstring, the package imports from anywhere, and
its version is the crate's."""

from __future__ import annotations

import inspect

import hubmsg
import hubmsg.aio
from conftest import run_python


def public(obj: object) -> list[tuple[str, object]]:
    return [(n, getattr(obj, n)) for n in dir(obj) if not n.startswith("_")]


def test_every_public_name_has_a_docstring() -> None:
    missing = []
    for mod in (hubmsg, hubmsg.aio):
        assert mod.__doc__
        for name, obj in public(mod):
            if not getattr(obj, "__module__", "hubmsg").startswith("hubmsg"):
                continue  # imported from elsewhere (typing, …)
            if inspect.isclass(obj):
                if not obj.__doc__:
                    missing.append(f"{mod.__name__}.{name}")
                if issubclass(obj, BaseException):
                    continue  # their members are the built-in exception's
                for attr, member in public(obj):
                    if callable(member) or isinstance(member, property) or type(member).__name__ == "getset_descriptor":
                        if not getattr(member, "__doc__", None):
                            missing.append(f"{mod.__name__}.{name}.{attr}")
    assert not missing, missing


def test_import_from_any_directory_prints_the_version() -> None:
    r = run_python("import hubmsg; print(hubmsg.__version__)", cwd="/")
    assert r.returncode == 0 and r.stdout.strip() == hubmsg.__version__ == "0.1.0", r.stderr
