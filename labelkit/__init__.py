"""labelkit: make, store, share and reuse self-labels.

The public API is re-exported here; heavy modules (torch, timm) load only when their names are used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Artefact": "labelkit.artefact",
    "Head": "labelkit.artefact",
    "read_artefact": "labelkit.artefact",
    "check_artefact": "labelkit.artefact",
    "LabelkitError": "labelkit.errors",
    "ArtefactError": "labelkit.errors",
    "DataError": "labelkit.errors",
    "ConfigError": "labelkit.errors",
    "SolverError": "labelkit.errors",
    "ImportSourceError": "labelkit.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'labelkit' has no attribute {name!r}")
