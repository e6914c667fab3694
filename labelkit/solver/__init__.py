"""Self-labelling by optimal transport: Sinkhorn-Knopp on P^lam (SeLa eq. 7-8).

``solve`` takes the logits (or features and a linear head) and three option objects: the :class:`Algorithm`,
the :class:`Balance` constraint and the :class:`Storage` of the kernel. The parts: ``_prior`` (cluster sizes
and the column step), ``_memory`` (where the kernel fits), ``_kernel`` (the stabilised kernel by row blocks),
``_sweep`` (one pass per iteration), ``_products`` (dense block products chosen per processor), ``_iterate``
(the loop and annealing), ``_rounding`` (exact balance and floors), ``_featurefile`` (features on disk).
No training and no data sources here."""

from .._util.lazy import lazy_exports

_EXPORTS = {
    "solve": "._solve",
    "SinkhornResult": "._solve",
    "label_probability": "._solve",
    "Algorithm": "._options",
    "Balance": "._options",
    "Storage": "._options",
    "Prior": "._prior",
    "balanced_labels": "._rounding",
    "floored_labels": "._rounding",
    "KERNEL_PATHS": "._memory",
    "available_memory": "._memory",
    "fit_block": "._memory",
    "working_bytes": "._memory",
    "kernel_path": "._memory",
    "features_on_disk": "._memory",
    "kernel_buffer": "._memory",
    "FeatureFile": "._featurefile",
    "FeatureWriter": "._featurefile",
    "write_features": "._featurefile",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
