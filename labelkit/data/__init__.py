"""Data sources keyed by stable sample ids (folders, shards, arrays, built-ins, embedding tables) and the
loaders, transforms and augmentations that turn them into batches."""

from .._util.lazy import lazy_exports

_EXPORTS = {
    "EmbeddingSource": "._embeddings",
    "is_embedding_spec": "._embeddings",
    "load_embeddings": "._embeddings",
    "train_transform": "._loading",
    "eval_transform": "._loading",
    "pretrained_transforms": "._loading",
    "augmentation_preset": "._loading",
    "AUGMENTATIONS": "._loading",
    "make_loader": "._loading",
    "SkipLog": "._loading",
    "rank_slice": "._loading",
    "batches_per_rank": "._loading",
    "Source": "._sources",
    "FolderSource": "._sources",
    "ArraySource": "._sources",
    "ShardSource": "._sources",
    "Manifest": "._sources",
    "resolve": "._sources",
    "register_builtin": "._sources",
    "BUILTINS": "._sources",
    "IMAGE_EXTENSIONS": "._sources",
    "compare_to_data": "._sources",
    "content_check": "._sources",
    "describe_match": "._sources",
    "decode_image": "._sources",
    "RemoteFolderSource": "._sources",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
