"""The label artefact: the Parquet format (defined once in :mod:`labelkit.artefact.format`), and what moves labels
in and out of it.

The parts: ``format`` (columns, metadata schema, versions, ids), ``_artefact`` (build and write), ``_writing``
(write a run's rows a part at a time), ``_reading`` (read, read the footer, validate), ``_tables`` (label CSVs
of any common layout),
``_importing`` (released SeLa labels, checkpoints, CSV, JSON, ``.npy``), ``released`` (the released label
sets and their download), ``_export`` (CSV, ``.npy``, JSON, summaries) and ``_hub`` (a Hub dataset folder)."""

from .._util.lazy import lazy_exports

_EXPORTS = {
    "Artefact": "._artefact",
    "Head": "._artefact",
    "producer_versions": "._artefact",
    "write_parts": "._writing",
    "ArtefactHeader": "._reading",
    "read_artefact": "._reading",
    "read_header": "._reading",
    "check_artefact": "._scan",
    "scan_artefact": "._scan",
    "iter_rows": "._scan",
    "artefact_path": "._reading",
    "artefact_files": "._reading",
    "output_beside": "._reading",
    "read_label_table": "._tables",
    "import_labels": "._importing",
    "imagefolder_keys": "._importing",
    "read_keys": "._importing",
    "export_artefact": "._export",
    "summarize": "._export",
    "EXPORT_FORMATS": "._export",
    "cluster_names": "._export",
    "export_hub": "._hub",
    "name_clusters": "._naming",
    "read_names": "._naming",
    "read_examples": "._naming",
    "names_from_examples": "._naming",
    "relabelling": "._naming",
    "HUB_ROWS_PER_FILE": "._hub",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
