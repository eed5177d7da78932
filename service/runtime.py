"""The serving core, independent of the HTTP framework: champions, hot swap, batching, predictions.

Hot swap: every worker polls the registry's generation counter (one SQL read). When it moves, the worker
loads the new champion versions beside the old ones and then replaces its champion map in one
assignment. A request resolves its adapter to a version once, at its start, so in-flight requests
finish on the version they started with, and every response names the version that served it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from models.artifacts import load_model
from models.classifier import Classifier
from models.derived import DerivedFiles
from models.export import softmax
from models.metadata import BASE, BASE_NAME, ModelMeta
from models.registry import (
    AdapterInfo,
    AdapterNotFoundError,
    CorruptAdapterError,
    RegistryError,
    open_registry,
)
from service import metrics
from service.background import OffPath
from service.config import ServiceConfig
from service.engine import Engine, Key, OnnxEngine, TorchEngine
from service.errors import ConflictError, OverloadedError, UnknownAdapterError
from service.inputs import InputCache

log = logging.getLogger("adaptserve")
RETRY_S = 10.0  # how often a worker retries loading a champion that failed to load


def _shed() -> None:
    raise OverloadedError("server overloaded: the request would wait longer than ADAPTSERVE_MAX_LATENCY_MS; retry")


class UnloadableVersionError(ConflictError):
    """A version whose files verify but that this worker's engine cannot load (409: it must not be promoted)."""


@dataclass
class Degraded:
    """An adapter whose champion cannot be loaded: what serves instead (None: nothing) and why."""

    champion: int
    serving: int | None
    reason: str
    since: float
    retried_at: float

    def to_dict(self) -> dict:
        return {"champion": self.champion, "serving": self.serving, "reason": self.reason, "since": self.since}


@dataclass
class Swap:
    adapter: str
    old: int | None
    new: int | None
    seconds: float


def make_engine(cfg: ServiceConfig, base: Classifier, base_meta: ModelMeta) -> Engine:
    if cfg.engine == "torch":
        return TorchEngine(base, base_meta, cfg.max_loaded)
    precision = "int8" if cfg.engine == "onnx-int8" else "fp32"
    return OnnxEngine(
        base,
        base_meta,
        cfg.home / "onnx-cache",
        cfg.max_loaded,
        cfg.threads,
        precision=precision,
        base_dir=cfg.base_model,
        int8_max_drop=cfg.int8_max_drop,
        derived=DerivedFiles.for_home(cfg.home),  # built once for every replica sharing the database and the store
    )


class Runtime:
    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.registry = open_registry(cfg.home)
        base, self.base_meta = load_model(cfg.base_model)
        self.base_id = self.base_meta.model_id
        self.classes: list[str] = list(self.base_meta.classes)
        self.transform = self.base_meta.preprocessing.eval_transform()
        self.engine = make_engine(cfg, base, self.base_meta)
        self.champions: dict[str, int] = {}
        self.generation = -1
        self.degraded: dict[str, Degraded] = {}  # adapters whose champion does not load here, and what serves
        self._preload_failed: set[Key] = set()  # challengers that did not load (not tried again by _preload)
        self._dispatch = None
        self._dispatch_loop: asyncio.AbstractEventLoop | None = None
        self.monitor = self._make_monitor() if cfg.monitor else None
        self.inputs, self._offpath = self._make_input_cache()
        self.refresh()
        metrics.ENGINE.labels(engine=self.engine.name).set(1)
        metrics.record_precision(BASE, self.served(*BASE))

    def _make_monitor(self):
        # scipy and the capture stores: loaded only when monitoring is on (ADAPTSERVE_MONITOR=1)
        from monitoring.config import MonitorConfig
        from monitoring.monitor import DriftMonitor

        return DriftMonitor(self.cfg.home, self.registry, self.cfg.base_model, MonitorConfig.from_env())

    def _make_input_cache(self):
        """Recent inputs by prediction id, so POST /feedback can label a prediction; written off the hot path."""
        if not self.cfg.feedback_max:
            return None, None
        cache = InputCache(self.cfg.home, ttl_s=self.cfg.feedback_ttl_s, max_items=self.cfg.feedback_max)
        return cache, OffPath("feedback-inputs")

    def lookup_input(self, prediction_id: str):
        """(adapter, version, image) of a recent prediction; waits for its off-path write when it is still queued."""
        if self.inputs is None:
            raise LookupError("feedback by prediction id is off (ADAPTSERVE_FEEDBACK_MAX_ITEMS=0); send the image")
        try:
            return self.inputs.get(prediction_id)
        except LookupError:
            if not self._offpath.flush(timeout=5.0):  # feedback right after its prediction: let the write land
                raise
            return self.inputs.get(prediction_id)

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
        if self._offpath is not None:
            self._offpath.close()

    # --- champions and hot swap -------------------------------------------------------------
    def refresh(self) -> list[Swap]:
        """Pick up registry changes; load new champions before publishing them. Cheap when nothing moved.

        A champion that fails to load (corrupt files, an engine error) does not take its adapter down: the worker
        keeps what it serves, else the latest earlier champion that loads, and records why in `degraded`. A
        degraded champion is retried every RETRY_S seconds, so repaired files clear the state without a promote."""
        gen = self.registry.generation()
        now = time.monotonic()
        retry = [n for n, d in self.degraded.items() if now - d.retried_at >= RETRY_S]
        if gen == self.generation and not retry:
            return []
        infos = self.registry.list_adapters()
        wanted = {i.name: i.champion for i in infos if i.champion is not None}
        champions, swaps = dict(self.champions), []
        for name in [n for n in champions if n not in wanted]:
            swaps.append(Swap(name, champions.pop(name), None, 0.0))
            self.degraded.pop(name, None)
        for name, version in wanted.items():
            known = self.degraded.get(name)
            if champions.get(name) == version and known is None:
                continue
            if known is not None and known.champion == version and name not in retry:
                continue
            start = time.perf_counter()
            serving = self._load_or_fall_back(name, version, champions.get(name))
            if serving != champions.get(name):
                swaps.append(Swap(name, champions.get(name), serving, time.perf_counter() - start))
            if serving is None:
                champions.pop(name, None)
            else:
                champions[name] = serving
        self.champions = champions  # one assignment: requests see the old map or the new one, never a mix
        self.generation = gen
        for s in swaps:
            metrics.record_swap(s.adapter, s.new, s.seconds)
        for name in wanted:
            metrics.DEGRADED.labels(adapter=name).set(1 if name in self.degraded else 0)
        if self.cfg.preload:
            self._preload(infos)  # after the switch: a challenger's load never delays a champion's
        return swaps

    def _preload(self, infos: Sequence[AdapterInfo]) -> None:
        """Load and warm each adapter's challenger (its newest version, newer than the champion: what a retrain job
        or a registration just published) as soon as it is registered, so that its promote only switches the map,
        in every worker. Only into free room (no champion is evicted for one); a challenger that fails is not
        retried here (its promote's preflight says why)."""
        for info in infos:
            newest = max((v.version for v in info.versions), default=None)
            if info.champion is None or newest is None or newest <= info.champion:
                continue
            key = (info.name, newest)
            if key in self._preload_failed or key in self.engine.loaded():
                continue
            if len(self.engine.loaded()) - 1 >= self.cfg.max_loaded:  # the base is not counted
                return
            try:
                self._load(info.name, newest)
                log.info("adapter %s: challenger v%s loaded and warmed ahead of its promote", info.name, newest)
            except Exception as err:
                self._preload_failed.add(key)
                log.warning("adapter %s: challenger v%s does not load (%s): its promote will be refused", info.name,
                            newest, err)

    def _load_or_fall_back(self, name: str, version: int, current: int | None) -> int | None:
        """Load `version`; on failure keep `current`, else try earlier champions newest first. What serves."""
        try:
            self._load(name, version)
        except Exception as err:  # a corrupt or mismatched adapter must not take serving down
            reason = f"version {version} refused: {err}"
            metrics.LOAD_FAILURES.labels(adapter=name).inc()
            serving = current if current is not None and current != version else self._last_good(name, version)
            old = self.degraded.get(name)
            since = old.since if old is not None and old.champion == version else time.time()
            self.degraded[name] = Degraded(version, serving, reason, since, time.monotonic())
            log.error("adapter %s: champion v%s refused, serving %s: %s", name, version,
                      f"v{serving}" if serving is not None else "nothing", err)
            return serving
        if name in self.degraded:
            log.info("adapter %s: champion v%s loads again; degraded state cleared", name, version)
        self.degraded.pop(name, None)
        return version

    def _last_good(self, name: str, bad: int) -> int | None:
        """The newest earlier champion (promotion history) that is still registered and loads."""
        live = {v.version for i in self.registry.list_adapters() if i.name == name for v in i.versions}
        tried: set[int] = {bad}
        for p in reversed(self.registry.history(name)):
            if p.version in tried or p.version not in live:
                continue
            tried.add(p.version)
            try:
                self._load(name, p.version)
                return p.version
            except Exception as err:
                log.error("adapter %s: earlier champion v%s does not load either: %s", name, p.version, err)
        return None

    def _load(self, name: str, version: int) -> None:
        av = self.registry.verify(name, version)
        fresh = (name, version) not in self.engine.loaded()
        self.engine.load((name, version), av.path)
        if fresh:  # warmed: ONNX Runtime's first run allocates its arena; no request should pay for that
            size = self.base_meta.preprocessing.crop_size
            self.engine.run(np.zeros((1, 3, size, size), np.float32), [(name, version)])
        metrics.ADAPTER_LOADS.labels(adapter=name).inc()
        metrics.record_precision((name, version), self.served(name, version))

    def preflight(self, name: str, version: int) -> None:
        """Before a promote: every file matches its sha256 and this worker's engine loads it (409 otherwise)."""
        try:
            self._load(name, version)  # re-hashes first: CorruptAdapterError (409) lists each changed or missing file
        except (CorruptAdapterError, AdapterNotFoundError):
            raise
        except Exception as err:
            raise UnloadableVersionError(f"adapter {name!r} version {version} cannot be served: {err}") from err

    def readiness(self) -> tuple[bool, dict]:
        """(ready, details) for /readyz: not ready while an adapter with a champion has nothing serving."""
        down = {n: d.to_dict() for n, d in self.degraded.items() if d.serving is None}
        fallback = {n: d.to_dict() for n, d in self.degraded.items() if d.serving is not None}
        details: dict = {"degraded": fallback} if fallback else {}
        if down:
            reasons = "; ".join(f"{n}: {d['reason']}" for n, d in sorted(down.items()))
            return False, {**details, "down": down, "reason": f"no version of these adapters can serve: {reasons}"}
        return True, details

    def served(self, name: str, version: int) -> dict | None:
        """How the engine serves this version: {"precision": "int8"|"fp32", "int8": measured, "reason": why fp32}."""
        return getattr(self.engine, "served", {}).get((name, version))

    def resolve(self, adapter: str | None) -> Key:
        if adapter is None or adapter == BASE_NAME:
            return BASE
        version = self.champions.get(adapter)
        if version is None:
            self.refresh()  # registered or promoted a moment ago, before the next poll
            version = self.champions.get(adapter)
        if version is None:
            raise UnknownAdapterError(self._unknown_message(adapter))
        return (adapter, version)

    def _unknown_message(self, adapter: str) -> str:
        if adapter in self.degraded:
            return f"adapter {adapter!r} has no loadable version: {self.degraded[adapter].reason}"
        try:
            names = [i.name for i in self.registry.list_adapters()]
        except RegistryError:
            names = []
        if adapter in names:
            return f"adapter {adapter!r} has no champion yet; promote a version first"
        known = ", ".join([BASE_NAME, *sorted(self.champions)])
        return f"unknown adapter {adapter!r}; serving: {known}"

    # --- inference -------------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        return torch.stack([self.transform(im) for im in images]).numpy()

    def run_jobs(self, jobs: Sequence[tuple[np.ndarray, Key]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """One engine call for many requests (the adaptive batcher's callback)."""
        sizes = [len(x) for x, _ in jobs]
        keys = [k for (x, k) in jobs for _ in range(len(x))]
        for k in set(keys) - set(self.engine.loaded()):
            self._load(*k)  # evicted by the LRU since the request resolved it: load it back
        x = jobs[0][0] if len(jobs) == 1 else np.concatenate([x for x, _ in jobs])
        metrics.BATCH_SIZE.observe(len(keys))
        logits, emb = self.engine.run(x, keys)
        bounds = np.cumsum([0, *sizes])
        return [(logits[a:b], emb[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    async def infer(self, x: np.ndarray, key: Key) -> tuple[np.ndarray, np.ndarray]:
        """Through BentoML's adaptive batcher (CorkDispatcher, the one `batchable` APIs use), in process."""
        loop = asyncio.get_running_loop()
        if self._dispatch is None or self._dispatch_loop is not loop:  # the dispatcher binds to one event loop
            from bentoml._internal.marshal.dispatcher import CorkDispatcher

            self._dispatch_loop = loop
            # A job is one request. Sizes count requests, not images: the dispatcher splits a job that does not
            # fit the remaining batch room, and a (images, key) pair cannot be split by its generic containers.
            dispatcher = CorkDispatcher(
                max_latency_in_ms=self.cfg.max_latency_ms,
                max_batch_size=self.cfg.max_batch,
                fallback=_shed,
                get_batch_size=lambda job: 1,
            )
            self._dispatch = dispatcher(self.run_jobs)
        return await self._dispatch((x, key))

    def format(self, probs: np.ndarray, key: Key, top_k: int) -> dict:
        order = np.argsort(-probs, axis=1)[:, :top_k]
        preds = []
        for p, idx in zip(probs, order, strict=True):
            top = [{"label": self.classes[i], "score": float(p[i])} for i in idx]
            preds.append({"id": uuid.uuid4().hex, "label": top[0]["label"], "score": top[0]["score"], "top_k": top})
        return {"predictions": preds, "adapter": key[0], "version": key[1]}

    async def predict(
        self,
        images: Sequence[Image.Image],
        adapter: str | None,
        top_k: int = 1,
        encoded: Sequence[bytes] | None = None,
    ) -> dict:
        """`encoded`: the file bytes of each image, when the caller has them (stored for feedback as they are)."""
        if not 1 <= top_k <= len(self.classes):
            raise ValueError(f"top_k must be between 1 and {len(self.classes)} (the number of classes), got {top_k}")
        key = self.resolve(adapter)
        start = time.perf_counter()
        x = await asyncio.to_thread(self.preprocess, images)
        logits, emb = await self.infer(x, key)
        probs = softmax(logits)
        result = self.format(probs, key, top_k)
        metrics.observe_request(key, time.perf_counter() - start, [p["label"] for p in result["predictions"]])
        self.capture(key, [p["id"] for p in result["predictions"]], images, probs, emb, encoded)
        return result

    def capture(
        self,
        key: Key,
        ids: list[str],
        images: Sequence[Image.Image],
        probs: np.ndarray,
        emb,
        encoded: Sequence[bytes] | None = None,
    ) -> None:
        """Hand the prediction to the monitor and the feedback cache; both do their work on their own threads."""
        if self.monitor is not None:
            self.monitor.record(key[0], key[1], ids, list(images), probs, emb)
        if self.inputs is not None:
            inputs, images = self.inputs, list(images)
            blobs = list(encoded) if encoded is not None else None
            self._offpath.submit(lambda: inputs.put_many(key[0], key[1], ids, images, encoded=blobs))
