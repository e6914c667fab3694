"""JSON Schema files generated from :mod:`labelkit.artefact.format` (installed as ``labelkit.schemas``)."""

from importlib import resources

ARTEFACT_METADATA_V1 = "artefact-metadata-v1.schema.json"


def read_text(name: str = ARTEFACT_METADATA_V1) -> str:
    return resources.files(__name__).joinpath(name).read_text()
