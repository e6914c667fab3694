"""Data: sources keyed by stable sample ids, and the transforms and loaders that turn them into batches.

The parts: ``_source`` (what every source is: :class:`Source`, map-style and stream sources), one module per
kind of data (``_folder``, ``_arrays`` with the built-ins, ``_shards``, ``_embeddings`` for vector tables),
``_resolve`` (a ``--data`` spec to a source, through one registry), ``_match`` (does an artefact fit a copy of
the data), ``_transforms`` (augmentation presets, the plain view, pretrained configs) and ``_loading``
(torch datasets and loaders, bad-sample logs)."""

from .._util.lazy import lazy_exports

_EXPORTS = {
    "Source": "._source",
    "Ids": "._ids",
    "RowIds": "._ids",
    "id_array": "._ids",
    "MapSource": "._source",
    "StreamSource": "._source",
    "Manifest": "._source",
    "decode_image": "._source",
    "IMAGE_EXTENSIONS": "._source",
    "FolderSource": "._folder",
    "RemoteFolderSource": "._folder",
    "ArraySource": "._arrays",
    "register_builtin": "._arrays",
    "BUILTINS": "._arrays",
    "ShardSource": "._shards",
    "EmbeddingSource": "._embeddings",
    "is_embedding_spec": "._embeddings",
    "load_embeddings": "._embeddings",
    "resolve": "._resolve",
    "register_source": "._resolve",
    "SOURCE_KINDS": "._resolve",
    "compare_to_data": "._match",
    "content_check": "._match",
    "describe_match": "._match",
    "Augmentation": "._transforms",
    "AUGMENTATION_PRESETS": "._transforms",
    "AUGMENTATIONS": "._transforms",
    "train_transform": "._transforms",
    "eval_transform": "._transforms",
    "pretrained_transforms": "._transforms",
    "run_transforms": "._transforms",
    "augmentation_preset": "._transforms",
    "Order": "._loading",
    "make_loader": "._loading",
    "SkipLog": "._loading",
    "rank_slice": "._loading",
    "batches_per_rank": "._loading",
    "keep_decoded": "._decoded",
    "decoding": "._decoded",
    "BatchTransform": "._decoded",
    "Decoded": "._decoded",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
