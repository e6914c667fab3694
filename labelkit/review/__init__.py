"""Review: a person's decisions on a head's clusters (name, accept, reject, merge, split, remove, move), kept in an
append-only log, served by a local web app, and materialised as a new artefact version."""

from __future__ import annotations

from .._util.lazy import lazy_exports

_EXPORTS = {
    "DecisionLog": "._decisions",
    "Decisions": "._decisions",
    "OPS": "._decisions",
    "replay": "._decisions",
    "materialise": "._decisions",
    "ReviewSession": "._session",
    "run_folder_of": "._session",
    "create_app": "._app",
    "serve": "._app",
    "TOOL_FORMATS": "._tools",
    "export_for_tool": "._tools",
    "import_from_tool": "._tools",
}


__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
