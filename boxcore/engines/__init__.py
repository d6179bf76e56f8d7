"""Forwarding engines, looked up by name.

Engine modules are imported lazily so boxd runs while some of them are
missing or cannot load on this machine (``linux`` needs netfilter, ``np``
needs npdrv).
"""

from __future__ import annotations

import importlib

from boxcore.engines.base import BoosterSession, Delivery, Engine, Route

__all__ = ["BoosterSession", "Delivery", "Engine", "Route", "ENGINE_NAMES", "get_engine",
           "available_engines"]

# name -> (module, class name)
ENGINE_NAMES: dict[str, tuple[str, str]] = {
    "user": ("boxcore.engines.user", "UserEngine"),
    "linux": ("boxcore.engines.linux", "LinuxEngine"),
    "np": ("boxcore.engines.np", "NPEngine"),
    "memory": ("boxcore.engines.memory", "MemoryEngine"),
}


class EngineUnavailable(LookupError):
    """The named engine does not exist or its module cannot be imported."""


def get_engine(name: str) -> type[Engine]:
    try:
        module_name, class_name = ENGINE_NAMES[name]
    except KeyError:
        raise EngineUnavailable(
            f"unknown engine {name!r} (choose from {', '.join(ENGINE_NAMES)})") from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise EngineUnavailable(f"engine {name!r} is not available: {exc}") from None
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise EngineUnavailable(f"engine {name!r}: {module_name} has no {class_name}") from None


def available_engines() -> dict[str, type[Engine]]:
    """Every engine whose module imports here (for boxd's --help and options)."""
    found: dict[str, type[Engine]] = {}
    for name in ENGINE_NAMES:
        try:
            found[name] = get_engine(name)
        except EngineUnavailable:
            continue
        except Exception:  # a half-written engine must not break boxd for the others
            continue
    return found
