"""The label artefact: the Parquet format (defined once in :mod:`labelkit.artefact.format`), reading, writing and
validating it, importing and exporting labels, the Hub card and the released SeLa label sets."""

from .._util.lazy import lazy_exports

_EXPORTS = {
    "Artefact": "._artefact",
    "ArtefactHeader": "._artefact",
    "Head": "._artefact",
    "read_artefact": "._artefact",
    "read_header": "._artefact",
    "check_artefact": "._artefact",
    "artefact_path": "._artefact",
    "artefact_files": "._artefact",
    "producer_versions": "._artefact",
    "import_labels": "._sharing",
    "export_artefact": "._sharing",
    "summarize": "._sharing",
    "imagefolder_keys": "._sharing",
    "read_keys": "._sharing",
    "EXPORT_FORMATS": "._sharing",
    "export_hub": "._sharing",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
