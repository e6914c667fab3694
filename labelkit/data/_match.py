"""Whether an artefact was made on a given copy of the data: its ids, and its contents where recorded."""

from __future__ import annotations

from ._resolve import resolve
from ._ids import id_array
from ._source import _MAX_EXAMPLES, Source

__all__ = ["compare_to_data", "content_check", "describe_match"]


def compare_to_data(artefact, spec: str) -> dict:
    """How the sample ids of an artefact and of a local copy of the data overlap."""
    import pyarrow as pa
    import pyarrow.compute as pc

    source = resolve(spec)
    art_ids = artefact.table.column("sample_id").combine_chunks()
    data_ids = id_array(source.ids)
    in_data = pc.is_in(art_ids, value_set=data_ids)
    in_art = pc.is_in(data_ids, value_set=art_ids)
    only_art = art_ids.filter(pc.invert(in_data))
    only_data = data_ids.filter(pc.invert(in_art))
    return {
        "data_count": len(source),
        "artefact_count": artefact.num_samples,
        "in_both": int(pc.sum(in_data.cast(pa.int64())).as_py() or 0),
        "only_in_artefact": len(only_art),
        "only_in_data": len(only_data),
        "examples_only_in_artefact": only_art[:_MAX_EXAMPLES].to_pylist(),
        "examples_only_in_data": only_data[:_MAX_EXAMPLES].to_pylist(),
        "fingerprint_match": artefact.metadata["data"]["fingerprint"] == source.fingerprint,
        "data_fingerprint": source.fingerprint,
        **content_check(artefact, source),
    }


def content_check(artefact, source: Source) -> dict:
    """Whether the data holds what the artefact was made on, as far as its content fingerprint tells:
    ``content_match`` is None when the artefact records none (format 1.0) or the ids differ anyway."""
    recorded = artefact.metadata["data"].get("content")
    if recorded is None or artefact.metadata["data"]["fingerprint"] != source.fingerprint:
        return {"content_match": None, "content_method": recorded["method"] if recorded else None}
    return {"content_match": recorded == source.content, "content_method": recorded["method"]}


def describe_match(report: dict) -> str:
    """What was compared, in words: ids, and the contents where the artefact allows."""
    if not report["fingerprint_match"]:
        return "ids differ (not the same list of samples)"
    what = {"sizes": "file sizes", "bytes": "contents"}.get(report["content_method"], "contents")
    if report["content_match"] is None:
        return "ids match; contents not checked (the artefact records no content fingerprint)"
    if report["content_match"]:
        return f"ids match; {what} match"
    return f"ids match but {what} differ: the same names hold other data"
