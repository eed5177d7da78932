"""Inference engines: one forward pass per batch gives logits and embeddings for any mix of adapters.

A key names what serves a row: `BASE` (the base model itself) or (adapter name, version).
- `OnnxEngine`: one ONNX Runtime session per key, of the merged model, checked against torch at build time.
  Sessions are thread-safe, so a new version is built beside the old one and swapped in by reference.
  A mixed batch runs each version's rows through its own session, one after the other: on CPU an image costs
  about the same at batch 1 as at batch 32, so splitting a batch by adapter costs little. What does cost is
  ONNX Runtime's default of spinning intra-op threads: every session owns a thread pool whose threads spin
  after each run, and with several sessions taking turns (or decode and capture threads beside them) those
  spins steal the cores the next session needs (measured on 2 cores, 2 threads, 8 sessions round-robin:
  throughput halved). Sessions here block instead of spinning.
- `TorchEngine`: one unmerged peft model holding every loaded adapter; a mixed batch runs one sub-batch per
  adapter version. peft mutates shared state (set_adapter), so calls are serialised by a lock.
`OnnxEngine(precision="int8")` (ADAPTSERVE_ENGINE=onnx-int8) serves each version from a statically quantized
int8 file (models/quantize.py) when its measured top-1 accuracy drop on labelled images is within `int8_max_drop`,
and the fp32 file otherwise; `served[key]` says which precision serves a key and why, with the measurement.
Both keep at most `max_loaded` adapter versions (least recently used out first).
A file a version's directory does not carry (the base's ONNX export, an fp32 or int8 file publish did not build)
comes from `derived` (models/derived.py): built once for every replica sharing the state database and the artifact
store, fetched and verified by the others, kept under `cache_dir` as this replica's copy. Without one (benchmarks,
unit tests) the engine builds into `cache_dir` itself.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.artifact_store import ArtifactError
from models.artifacts import file_sha256, load_adapter_model, read_adapter_meta
from models.classifier import Classifier
from models.derived import Builds, DerivedBusy, LocalBuilds
from models.export import ONNX_FILE, export_onnx, exporter_id, onnx_providers, state_digest
from models.metadata import ADAPTER_FILES, BASE, ModelMeta
from models.quantize import (
    DEFAULT_MAX_DROP,
    INT8_FILE,
    INT8_REPORT,
    Int8Report,
    QuantizeError,
    build_int8,
    calibration_recipe,
    labelled_arrays,
)

log = logging.getLogger("adaptserve")

Key = tuple[str, int]  # (adapter name, version); BASE (models/metadata.py) is the base model itself


class Engine(ABC):
    name: str = "engine"

    def __init__(self, base: Classifier, base_meta: ModelMeta, max_loaded: int = 32) -> None:
        self.base = base.eval()
        self.base_meta = base_meta
        self.size = base_meta.preprocessing.crop_size
        self.max_loaded = max_loaded
        self.evictions = 0
        self._lock = threading.RLock()

    @abstractmethod
    def load(self, key: Key, adapter_dir: Path) -> None:
        """Make `key` servable (slow: build/verify). Idempotent."""

    @abstractmethod
    def unload(self, key: Key) -> None: ...

    @abstractmethod
    def loaded(self) -> list[Key]: ...

    @abstractmethod
    def run(self, x: np.ndarray, keys: list[Key]) -> tuple[np.ndarray, np.ndarray]:
        """x: (N, 3, H, W) float32 preprocessed; keys: one per row. Returns (logits, embeddings)."""

    def _evict_beyond(self, keep: Key) -> list[Key]:
        """Drop least recently used adapter versions until at most `max_loaded` remain (base excluded)."""
        others = [k for k in self.loaded() if k not in (keep, BASE)]
        gone = others[: max(0, len(others) + 1 - self.max_loaded)]
        for k in gone:
            self.unload(k)
            self.evictions += 1
        return gone


def _groups(keys: list[Key]) -> dict[Key, np.ndarray]:
    order: dict[Key, list[int]] = {}
    for i, k in enumerate(keys):
        order.setdefault(k, []).append(i)
    return {k: np.asarray(v) for k, v in order.items()}


class OnnxEngine(Engine):
    name = "onnx"

    def __init__(
        self,
        base: Classifier,
        base_meta: ModelMeta,
        cache_dir: Path,
        max_loaded: int = 32,
        threads: int = 0,
        spin: bool = False,
        precision: str = "fp32",
        base_dir: Path | None = None,
        int8_max_drop: float = DEFAULT_MAX_DROP,
        derived: Builds | None = None,
    ) -> None:
        super().__init__(base, base_meta, max_loaded)
        if precision not in ("fp32", "int8"):
            raise ValueError(f"precision must be fp32 or int8, got {precision!r}")
        self.precision = precision
        self.name = "onnx" if precision == "fp32" else "onnx-int8"
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.int8_max_drop = int8_max_drop
        self.cache_dir = Path(cache_dir)
        self.threads = threads or None
        self.spin = spin
        self.derived = derived or LocalBuilds()
        self._base_digest: str | None = None
        self.served: dict[Key, dict[str, Any]] = {}
        self._sessions: OrderedDict[Key, Any] = OrderedDict()
        self._sessions[BASE] = self._build(BASE, None)

    def _cache(self) -> Path:
        return self.cache_dir / self.base_meta.model_id.replace("@", "-")

    def _build(self, key: Key, adapter_dir: Path | None):
        path = adapter_dir / ONNX_FILE if adapter_dir is not None else None
        if path is None or not path.is_file():
            path = self._fp32(key, adapter_dir)
        info: dict[str, Any] = {"precision": "fp32"}
        if self.precision == "int8":
            path, info = self._int8(key, adapter_dir, path)
        sess = open_session(path, self.threads, self.spin)
        with self._lock:
            self.served[key] = info
        return sess

    def _fp32(self, key: Key, adapter_dir: Path | None) -> Path:
        """The exported fp32 file of a key whose directory has none: the base, or a version published without one.
        Keyed by all the export depends on, so another base, adapter or exporter never meets a stale file."""
        if self._base_digest is None:
            self._base_digest = state_digest(self.base)
        if adapter_dir is not None:
            read_adapter_meta(adapter_dir)  # every adapter file is there (or an error naming the missing one)
        source = "base" if adapter_dir is None else f"adapter-{_files_digest(adapter_dir, ADAPTER_FILES)}"
        derived_key = f"onnx:{self.base_meta.model_id}:{self._base_digest}:{source}:{self.size}:{exporter_id()}"

        def export(tmp: Path) -> None:
            model = self.base if adapter_dir is None else self._torch_model(adapter_dir)
            export_onnx(model, tmp / ONNX_FILE, self.size)

        dest = self._cache() / f"{key[0]}-v{key[1]}-{_short(derived_key)}.onnx"
        return self.derived.get_or_build_files(derived_key, export, {ONNX_FILE: dest})[ONNX_FILE]

    def _int8(self, key: Key, adapter_dir: Path | None, fp32: Path) -> tuple[Path, dict[str, Any]]:
        """The int8 file of `key` (prebuilt by publish, else built once for every replica) when its measured accuracy
        drop is acceptable; else the fp32 file, with the reason."""
        if adapter_dir is not None and (adapter_dir / INT8_FILE).is_file() and (adapter_dir / INT8_REPORT).is_file():
            q, report_path = adapter_dir / INT8_FILE, adapter_dir / INT8_REPORT
        else:
            try:
                q, report_path = self._shared_int8(key, adapter_dir, fp32)
            except QuantizeError as err:
                return fp32, {"precision": "fp32", "reason": f"int8 not possible: {err}"}
            except (ArtifactError, DerivedBusy) as err:  # built elsewhere, but not to be had here
                log.warning("int8 files of %s v%s not fetched (%s); serving fp32", *key, err)
                return fp32, {"precision": "fp32", "reason": f"int8 files not fetched: {err}"}
            except Exception as err:  # a failed quantization must not keep a servable version from serving
                log.exception("int8 build of %s v%s failed; serving fp32", *key)
                return fp32, {"precision": "fp32", "reason": f"int8 build failed: {err}"}
        try:
            report = Int8Report.load(report_path)
        except (OSError, ValueError, TypeError) as err:
            return fp32, {"precision": "fp32", "reason": f"int8 report {report_path.name} unreadable: {err}"}
        if not report.acceptable(self.int8_max_drop):
            return fp32, {
                "precision": "fp32",
                "int8": report.to_dict(),
                "reason": f"int8 refused: top-1 accuracy {100 * report.delta:+.2f} points on {report.eval_set}, "
                f"beyond ADAPTSERVE_INT8_MAX_DROP={self.int8_max_drop:g}",
            }
        return q, {"precision": "int8", "int8": report.to_dict()}

    def _shared_int8(self, key: Key, adapter_dir: Path | None, fp32: Path) -> tuple[Path, Path]:
        """(int8 file, report), keyed by the fp32 file's content and the calibration recipe: a re-registered
        name-version or new samples never hit a stale file."""
        dirs = [adapter_dir, self.base_dir]
        derived_key = f"int8:{file_sha256(fp32)}:{calibration_recipe(dirs, self.base_meta.preprocessing)}"

        def quantize(tmp: Path) -> None:
            build_int8(fp32, tmp / INT8_FILE, labelled_arrays(dirs, self.base_meta.preprocessing), tmp / INT8_REPORT)

        stem = f"{key[0]}-v{key[1]}-{_short(derived_key)}"
        dests = {INT8_FILE: self._cache() / f"{stem}.int8.onnx", INT8_REPORT: self._cache() / f"{stem}.int8.json"}
        files = self.derived.get_or_build_files(derived_key, quantize, dests)
        return files[INT8_FILE], files[INT8_REPORT]

    def _torch_model(self, adapter_dir: Path):
        model, _ = load_adapter_model(adapter_dir, copy.deepcopy(self.base), self.base_meta)
        return model

    def load(self, key: Key, adapter_dir: Path) -> None:
        with self._lock:
            if key in self._sessions:
                self._sessions.move_to_end(key)
                return
        sess = self._build(key, adapter_dir)  # outside the lock: other versions keep serving meanwhile
        with self._lock:
            self._sessions[key] = sess
            self._evict_beyond(key)

    def unload(self, key: Key) -> None:
        with self._lock:
            self._sessions.pop(key, None)
            self.served.pop(key, None)

    def loaded(self) -> list[Key]:
        return list(self._sessions)

    def run(self, x: np.ndarray, keys: list[Key]) -> tuple[np.ndarray, np.ndarray]:
        groups = _groups(keys)
        with self._lock:
            sessions = {k: self._sessions[k] for k in groups}  # KeyError: caller must load() first
            for k in groups:
                self._sessions.move_to_end(k)
        if len(groups) == 1:
            (key,) = groups
            logits, emb = sessions[key].run(None, {"input": x})
            return logits, emb
        logits = emb = None
        for key, idx in groups.items():
            lg, em = sessions[key].run(None, {"input": np.ascontiguousarray(x[idx])})
            if logits is None:
                logits = np.empty((len(keys), lg.shape[1]), np.float32)
                emb = np.empty((len(keys), em.shape[1]), np.float32)
            logits[idx], emb[idx] = lg, em
        return logits, emb


def _short(derived_key: str) -> str:
    """The part of a local cache file's name that says which derived build it holds."""
    return hashlib.sha256(derived_key.encode()).hexdigest()[:16]


def _files_digest(directory: Path, names: tuple[str, ...]) -> str:
    """One sha256 over the named files of a directory (an adapter's weights, config and metadata)."""
    return hashlib.sha256("".join(f"{name}:{file_sha256(directory / name)}\n" for name in names).encode()).hexdigest()


def open_session(path: Path, threads: int | None, spin: bool = False):
    """An inference session: all graph optimisations, `threads` intra-op threads (None: ONNX Runtime's default,
    one per physical core), sequential execution, and threads that block rather than spin when idle."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(str(path), options, providers=onnx_providers())


def _adapter_name(key: Key) -> str:
    return f"{key[0]}__v{key[1]}"


class TorchEngine(Engine):
    """peft, unmerged, mixed-adapter batches: the reference engine (and the benchmark's baseline)."""

    name = "torch"

    def __init__(
        self, base: Classifier, base_meta: ModelMeta, max_loaded: int = 32, device: str | None = None
    ) -> None:
        super().__init__(base, base_meta, max_loaded)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model: Any = self.base.to(self.device)
        self._keys: OrderedDict[Key, None] = OrderedDict({BASE: None})
        self._embedding: torch.Tensor | None = None
        self.base.backbone.register_forward_hook(self._keep_embedding)

    def _keep_embedding(self, module, inputs, output) -> None:
        self._embedding = output

    def load(self, key: Key, adapter_dir: Path) -> None:
        from peft import PeftModel

        with self._lock:
            if key in self._keys:
                self._keys.move_to_end(key)
                return
            read_adapter_meta(adapter_dir)
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(adapter_dir), adapter_name=_adapter_name(key), is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(self.base, str(adapter_dir), adapter_name=_adapter_name(key))
            self.model.eval()
            self._keys[key] = None
            self._evict_beyond(key)

    def unload(self, key: Key) -> None:
        with self._lock:
            if key in self._keys and key != BASE:
                self.model.delete_adapter(_adapter_name(key))
                del self._keys[key]

    def loaded(self) -> list[Key]:
        return list(self._keys)

    def _forward(self, batch: torch.Tensor, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            return self.model(batch), self._embedding
        if key == BASE:
            with self.model.disable_adapter():
                return self.model(batch), self._embedding
        self.model.set_adapter(_adapter_name(key))
        return self.model(batch), self._embedding

    @torch.inference_mode()
    def run(self, x: np.ndarray, keys: list[Key]) -> tuple[np.ndarray, np.ndarray]:
        """One forward per adapter version in the batch: peft's mixed-batch forward (`adapter_names=`) does
        not cover the norm layers our adapters own, and set_adapter() mutates the model, hence the lock."""
        batch = torch.from_numpy(x).to(self.device)
        logits = emb = None
        with self._lock:
            for key, idx in _groups(keys).items():
                if key not in self._keys:
                    raise KeyError(key)
                lg, em = self._forward(batch[torch.from_numpy(idx)] if len(idx) < len(keys) else batch, key)
                if logits is None:
                    logits = np.empty((len(keys), lg.shape[1]), np.float32)
                    emb = np.empty((len(keys), em.shape[1]), np.float32)
                logits[idx], emb[idx] = lg.float().cpu().numpy(), em.float().cpu().numpy()
        return logits, emb
