"""How every experiment hands out its result: JSON on stdout, ``--json FILE``, ``--plot FILE``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable


def write_result(result: Any, json_path: Path | None = None, plot_path: Path | None = None,
                 plot: Callable[[Any, Path], None] | None = None, *, echo: bool = True,
                 sort_keys: bool = False) -> None:
    """Print ``result`` as JSON (``echo``), write it to ``json_path`` and draw it with
    ``plot(result, plot_path)``, making the files' directories as needed."""
    text = json.dumps(result, indent=2, sort_keys=sort_keys)
    if echo:
        print(text)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
    if plot_path is not None and plot is not None:
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        plot(result, plot_path)
