"""Measures on labels: contingency metrics (NMI, AMI, ARI), scoring against truth, label-free quality and
which-K, consensus labels across heads, and the matching of one labelling's clusters to another's (align, diff)."""

from .._util.lazy import lazy_exports

_EXPORTS = {
    "kmeans": "._kmeans",
    "spherical_kmeans": "._kmeans",
    "unit_centroids": "._kmeans",
    "ConsensusResult": "._consensus",
    "consensus_labels": "._consensus",
    "consensus_artefact": "._consensus",
    "consensus_of_predictions": "._consensus",
    "Transitions": "._align",
    "match_clusters": "._align",
    "align_artefact": "._align",
    "compare_artefacts": "._align",
    "head_quality": "._label_free",
    "recommend_k": "._label_free",
    "probe_accuracy": "._label_free",
    "neighbour_agreement": "._label_free",
    "QUALITY_ROWS": "._label_free",
    "Contingency": "._metrics",
    "contingency": "._metrics",
    "mutual_info": "._metrics",
    "entropy": "._metrics",
    "nmi": "._metrics",
    "ami": "._metrics",
    "ari": "._metrics",
    "expected_mutual_info": "._metrics",
    "compare": "._metrics",
    "agreement": "._metrics",
    "size_stats": "._metrics",
    "AVERAGES": "._metrics",
    "load_truth": "._scoring",
    "score_artefact": "._scoring",
    "cluster_rows": "._scoring",
    "parse_heads": "._scoring",
    "label_free": "._scoring",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
