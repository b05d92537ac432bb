"""LightGBM models compiled to machine code for the request path (lleaves, on LLVM).

LightGBM's ``Booster.predict`` walks its trees node by node through generic C++ and a Python
wrapper: on one WikiMEL fusion list (~120 candidates x 252 trees) that was 0.55 ms of the
2.75 ms fusion added per mention. lleaves (MIT, https://github.com/siboehm/lleaves) turns a LightGBM
``model.txt`` into one native function per forest with llvmlite: the same thresholds in
float64, the same missing-value rules and the same objective transform, so the outputs equal
LightGBM's to float64 rounding (``tests/test_compiled_trees.py``): 0.116 against 0.551 ms on
those lists, side by side (``bench/results/fusion-ab.md``, ``bench/results/wikimel.md``).

Compiling takes ~1-2 s per forest, so the object code is cached: ``<cache>/trees-<key>.o``,
the key hashing the model text, the LLVM target (triple, CPU, features), the llvmlite and
lleaves versions and the compile flags, so an object is only reused by the machine kind it
was made for. The object is written under a temporary name and renamed into place (two
workers starting together never read half a file). An unwritable cache only costs the
compile at each start.

SHAP contributions (``explain``) and persistence stay with LightGBM: the compiled form is a
runtime of the same model, never saved as the model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

TREE_RUNTIMES = ("lightgbm", "compiled")
# lleaves' flags: float64 like LightGBM; its default cache blocking (34 trees a block)
_FLAGS = "fp64=1;fblocksize=34;fcodemodel=large;finline=1"


def compiled_available() -> bool:
    """Whether lleaves (and a working llvmlite) can be imported here."""
    try:
        import lleaves  # noqa: F401
    except Exception:  # an llvmlite without the API lleaves uses raises more than ImportError
        return False
    return True


def resolve_tree_runtime(requested: str | None) -> str:
    """``requested`` (``TREE_RUNTIMES``), or None: compiled when lleaves is installed, else
    LightGBM with a warning. An explicit ``compiled`` without lleaves raises."""
    if requested is not None and requested not in TREE_RUNTIMES:
        raise ValueError(f"tree runtime must be one of {TREE_RUNTIMES}, got {requested!r}")
    if requested == "lightgbm":
        return requested
    if compiled_available():
        return "compiled"
    if requested == "compiled":
        raise RuntimeError("fusion_trees=compiled needs lleaves (pip install lleaves)")
    logger.warning("lleaves is not installed: the fusion trees run in LightGBM (slower)")
    return "lightgbm"


def _target() -> str:
    import llvmlite.binding as llvm

    llvm.initialize()
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    try:
        features = llvm.get_host_cpu_features().flatten()
    except RuntimeError:
        features = ""
    return f"{llvm.get_process_triple()};{llvm.get_host_cpu_name()};{features}"


def cache_key(model_text: str) -> str:
    """What a compiled object depends on: the model, the target machine, the compilers."""
    import importlib.metadata as md

    h = hashlib.sha256(model_text.encode())
    for part in (_target(), md.version("llvmlite"), md.version("lleaves"), _FLAGS):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:24]


class CompiledTrees:
    """One LightGBM model (its ``model_to_string()`` text) as native code: ``predict`` takes
    (N, F) features and returns (N,) float64, what ``Booster.predict`` returns."""

    def __init__(self, model_text: str, cache_dir: str | os.PathLike[str] | None = None) -> None:
        import lleaves

        t0 = time.perf_counter()
        self.key = cache_key(model_text)
        with tempfile.TemporaryDirectory(prefix="mel-trees-") as tmp:
            src = Path(tmp) / "model.txt"  # lleaves parses a file
            src.write_text(model_text, encoding="utf-8")
            self.model = lleaves.Model(str(src))
            obj, cached = self._object_path(cache_dir), False
            if obj is not None and obj.is_file():
                self.model.compile(cache=str(obj))
                cached = True
            elif obj is not None:
                part = obj.with_name(f"{obj.name}.{os.getpid()}.tmp")
                self.model.compile(cache=str(part))
                try:
                    part.replace(obj)
                except OSError:
                    part.unlink(missing_ok=True)
            else:
                self.model.compile()
        self.features = int(self.model.num_feature())
        logger.info(
            "fusion trees %s: %d trees %s in %.2f s",
            self.key,
            self.model.num_trees(),
            "loaded from cache" if cached else "compiled",
            time.perf_counter() - t0,
        )

    def _object_path(self, cache_dir: str | os.PathLike[str] | None) -> Path | None:
        """``<cache_dir>/trees-<key>.o``, None when there is no cache or it cannot be made."""
        if cache_dir is None:
            return None
        folder = Path(cache_dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            logger.info(
                "fusion trees: no compile cache in %s (%s): compiling each start", folder, e
            )
            return None
        if not os.access(folder, os.W_OK):
            path = folder / f"trees-{self.key}.o"
            return path if path.is_file() else None
        return folder / f"trees-{self.key}.o"

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N, F) -> (N,) float64, on this thread (the call releases the GIL)."""
        x = np.ascontiguousarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.features:
            raise ValueError(f"expected (N, {self.features}) features, got {x.shape}")
        if not len(x):
            return np.zeros(0, dtype=np.float64)
        return np.asarray(self.model.predict(x, n_jobs=1), dtype=np.float64)


__all__ = [
    "TREE_RUNTIMES",
    "CompiledTrees",
    "cache_key",
    "compiled_available",
    "resolve_tree_runtime",
]
