"""What a user can get wrong in the index job, as typed errors.

Library functions raise these; only the CLI (:mod:`index.cli`) turns them into a message on
stderr and an exit code. Where a caller could catch a builtin before these existed (a missing KB
was a ``FileNotFoundError``, a model mismatch in ``add`` an ``IndexMismatchError``, an empty IVF
index a ``ValueError``), the error still derives from it, so those handlers keep working.
"""

from __future__ import annotations

from index.store import IndexMismatchError


class IndexBuildError(Exception):
    """Base of the index job's user errors; the message says what is wrong and what to do."""


class KBNotFoundError(IndexBuildError, FileNotFoundError):
    """No KB file where ``--kb`` points."""


class InvalidShardError(IndexBuildError, ValueError):
    """A shard id outside ``[0, num_shards)``."""


class ForeignChunksError(IndexBuildError):
    """The output folder holds chunks of another build (KB, model, chunking or sharding)."""


class ShardMismatchError(IndexBuildError):
    """Shard folders given to one merge belong to different builds."""


class DuplicateChunkError(IndexBuildError):
    """One chunk is in two of the shard folders given to a merge."""


class IncompleteBuildError(IndexBuildError):
    """A merge that lacks chunks: a shard not built yet, or killed before it finished."""


class ModelMismatchError(IndexBuildError, IndexMismatchError):
    """Chunks, or an index folder, encoded by another model than the one given."""


class UnknownEngineError(IndexBuildError, ValueError):
    """An ``--engine`` that is not one of ``index.build.ENGINES``."""


class EmptyTrainingSetError(IndexBuildError, ValueError):
    """A FAISS type that needs training (IVF, PQ) over an index with no vectors."""


class EncoderRuntimeError(IndexBuildError):
    """The encoder runtime asked for cannot run this model (backend, package, export)."""


__all__ = [
    "DuplicateChunkError",
    "EmptyTrainingSetError",
    "EncoderRuntimeError",
    "ForeignChunksError",
    "IncompleteBuildError",
    "IndexBuildError",
    "InvalidShardError",
    "KBNotFoundError",
    "ModelMismatchError",
    "ShardMismatchError",
    "UnknownEngineError",
]
