"""Forwarding engines, looked up by name.

Engine modules are imported lazily so boxd runs while some of them are
missing or cannot load on this machine (``linux`` needs netfilter, ``np``
needs npdrv, ``xdp`` needs libbpf and its compiled BPF object).
"""

from __future__ import annotations

import importlib
import logging

from boxcore.engines.base import BoosterSession, Delivery, Engine, EngineSetupError, Route

log = logging.getLogger("boxcore.engines")

__all__ = ["BoosterSession", "Delivery", "Engine", "EngineSetupError", "Route", "ENGINE_NAMES", "get_engine",
           "available_engines"]

# name -> (module, class name)
ENGINE_NAMES: dict[str, tuple[str, str]] = {
    "user": ("boxcore.engines.user", "UserEngine"),
    "linux": ("boxcore.engines.linux", "LinuxEngine"),
    "np": ("boxcore.engines.np", "NPEngine"),
    "xdp": ("boxcore.engines.xdp", "XdpEngine"),
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
    cls = getattr(module, class_name, None)
    if cls is None:  # any Engine subclass in the module that calls itself ``name``
        cls = next((obj for obj in vars(module).values() if isinstance(obj, type)
                    and issubclass(obj, Engine) and obj is not Engine and getattr(obj, "name", None) == name),
                   None)
    if cls is None:
        raise EngineUnavailable(f"engine {name!r}: {module_name} has no {class_name}")
    return cls


def available_engines() -> dict[str, type[Engine]]:
    """Every engine whose module imports here (for boxd's --help and options)."""
    found: dict[str, type[Engine]] = {}
    for name in ENGINE_NAMES:
        try:
            found[name] = get_engine(name)
        except EngineUnavailable:
            continue
        except Exception as exc:  # a half-written engine must not break boxd for the others
            log.warning("engine %s cannot load: %s: %s", name, type(exc).__name__, exc)
            continue
    return found
