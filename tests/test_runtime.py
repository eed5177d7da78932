"""The serving core: champions, hot swap, refusal of corrupt adapters, batching through the dispatcher."""

import asyncio
from pathlib import Path

import numpy as np
import pytest

from models.registry import open_registry
from pipelines.data import digits_splits
from service.config import ServiceConfig
from service.runtime import Runtime, UnknownAdapterError


@pytest.fixture
def runtime(service_home: Path, source_model: Path) -> Runtime:
    return Runtime(ServiceConfig(home=service_home, base_model=source_model))


def _images(n: int = 4):
    return digits_splits(32).test.images[:n]


def test_requests_are_served_by_the_champion_and_name_it(runtime: Runtime) -> None:
    result = asyncio.run(runtime.predict(_images(3), "site-a", top_k=3))
    assert (result["adapter"], result["version"]) == ("site-a", 1)
    assert len(result["predictions"]) == 3 and len({p["id"] for p in result["predictions"]}) == 3
    top = result["predictions"][0]["top_k"]
    assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    assert asyncio.run(runtime.predict(_images(1), None))["adapter"] == "base"


def test_promote_from_another_process_is_picked_up_and_in_flight_keys_still_run(
    runtime: Runtime, service_home: Path
) -> None:
    old_key = runtime.resolve("site-a")
    open_registry(service_home).promote("site-a", 2)  # e.g. another worker or the CLI
    swaps = runtime.refresh()
    assert [(s.adapter, s.old, s.new) for s in swaps] == [("site-a", 1, 2)]
    assert runtime.resolve("site-a") == ("site-a", 2)
    x = runtime.preprocess(_images(2))
    (old_logits, _), (new_logits, _) = runtime.run_jobs([(x, old_key), (x, ("site-a", 2))])
    assert np.abs(old_logits - new_logits).max() > 1e-3  # the request that started on v1 finished on v1
    assert runtime.refresh() == []  # nothing moved since: no work


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
def test_a_challenger_is_loaded_and_warmed_before_its_promote_so_the_swap_only_switches(
    service_home: Path, source_model: Path, preload: bool
) -> None:
    """site-a v2 is newer than its champion v1: with preload, every worker has it loaded and warmed (one run done)
    before anyone promotes it; the promote's refresh then builds nothing. Without, the swap builds it."""
    rt = Runtime(ServiceConfig(home=service_home, base_model=source_model, preload=preload))
    assert (("site-a", 2) in rt.engine.loaded()) is preload
    assert ("site-b", 1) in rt.engine.loaded() and ("site-a", 1) in rt.engine.loaded()
    built: list = []
    build = rt.engine._build
    rt.engine._build = lambda key, path: built.append(key) or build(key, path)
    open_registry(service_home).promote("site-a", 2)
    assert [(s.adapter, s.old, s.new) for s in rt.refresh()] == [("site-a", 1, 2)]
    assert built == ([] if preload else [("site-a", 2)])
    assert asyncio.run(rt.predict(_images(1), "site-a"))["version"] == 2


def test_a_challenger_that_does_not_load_is_not_retried_and_its_promote_is_refused(
    service_home: Path, source_model: Path
) -> None:
    registry = open_registry(service_home)
    _corrupt(registry.path("site-a", 2) / "adapter_model.safetensors")
    rt = Runtime(ServiceConfig(home=service_home, base_model=source_model))
    assert ("site-a", 2) not in rt.engine.loaded() and ("site-a", 2) in rt._preload_failed
    with pytest.raises(Exception, match="adapter_model.safetensors"):
        rt.preflight("site-a", 2)
    assert rt.resolve("site-a") == ("site-a", 1)


def test_a_full_worker_preloads_nothing(service_home: Path, source_model: Path) -> None:
    """max_loaded 2: the two champions fill it; no champion is evicted for a challenger."""
    rt = Runtime(ServiceConfig(home=service_home, base_model=source_model, max_loaded=2))
    assert sorted(k for k in rt.engine.loaded() if k[0] != "base") == [("site-a", 1), ("site-b", 1)]


def test_a_corrupt_new_version_is_refused_and_the_champion_keeps_serving(runtime: Runtime, service_home: Path) -> None:
    registry = open_registry(service_home)
    weights = registry.path("site-a", 2) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    registry.promote("site-a", 2, verify=False)  # e.g. files damaged after the promote
    runtime.refresh()
    assert runtime.resolve("site-a") == ("site-a", 1)
    assert "version 2 refused" in runtime.degraded["site-a"].reason
    assert runtime.degraded["site-a"].serving == 1
    assert asyncio.run(runtime.predict(_images(1), "site-a"))["version"] == 1


def _corrupt(path: Path) -> bytes:
    original = path.read_bytes()
    path.write_bytes(original[:-4096] + b"\0" * 4096)
    return original


def test_preflight_refuses_a_corrupt_version_before_the_champion_changes(runtime: Runtime, service_home: Path) -> None:
    from models.registry import CorruptAdapterError

    registry = open_registry(service_home)
    _corrupt(registry.path("site-a", 2) / "model.onnx")
    with pytest.raises(CorruptAdapterError, match="adapter 'site-a' version 2 is corrupt: file 'model.onnx'"):
        runtime.preflight("site-a", 2)
    with pytest.raises(CorruptAdapterError):
        registry.promote("site-a", 2)  # the registry re-hashes too: the CLI and jobs cannot promote it either
    assert registry.champion("site-a").version == 1


def test_a_champion_damaged_before_a_restart_falls_back_to_the_last_good_one_and_recovers(
    service_home: Path, source_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.runtime as runtime_module

    registry = open_registry(service_home)
    registry.promote("site-a", 2)
    weights = registry.path("site-a", 2) / "adapter_model.safetensors"
    original = _corrupt(weights)
    runtime = Runtime(ServiceConfig(home=service_home, base_model=source_model))  # a restart
    assert runtime.resolve("site-a") == ("site-a", 1)  # v1: the champion before v2 in the history
    assert runtime.degraded["site-a"].to_dict()["champion"] == 2
    assert runtime.readiness() == (True, {"degraded": {"site-a": runtime.degraded["site-a"].to_dict()}})

    weights.write_bytes(original)  # repaired: the next retry clears the state without any promote
    monkeypatch.setattr(runtime_module, "RETRY_S", 0.0)
    runtime.refresh()
    assert runtime.resolve("site-a") == ("site-a", 2) and runtime.degraded == {}


def test_not_ready_while_an_adapter_has_no_version_that_loads(service_home: Path, source_model: Path) -> None:
    registry = open_registry(service_home)
    _corrupt(registry.path("site-b", 1) / "adapter_model.safetensors")
    runtime = Runtime(ServiceConfig(home=service_home, base_model=source_model))
    ready, details = runtime.readiness()
    assert not ready and details["down"]["site-b"]["serving"] is None
    assert details["reason"].startswith("no version of these adapters can serve: site-b: version 1 refused:")
    with pytest.raises(UnknownAdapterError, match="adapter 'site-b' has no loadable version: version 1 refused"):
        runtime.resolve("site-b")


@pytest.mark.parametrize(
    "adapter, message",
    [("nope", "unknown adapter 'nope'; serving: base, site-a, site-b")],
    ids=["unknown"],
)
def test_unknown_adapter_message(runtime: Runtime, adapter: str, message: str) -> None:
    with pytest.raises(UnknownAdapterError) as err:
        runtime.resolve(adapter)
    assert str(err.value) == message


def test_top_k_out_of_range_is_refused(runtime: Runtime) -> None:
    with pytest.raises(ValueError, match=r"top_k must be between 1 and 10 \(the number of classes\), got 11"):
        asyncio.run(runtime.predict(_images(1), "site-a", top_k=11))


def test_concurrent_requests_are_batched_together(runtime: Runtime) -> None:
    async def burst():
        return await asyncio.gather(
            *[runtime.predict(_images(1), ["site-a", "site-b", None][i % 3]) for i in range(24)]
        )

    results = asyncio.run(burst())
    assert [r["adapter"] for r in results] == ["site-a", "site-b", "base"] * 8
    from service import metrics

    counts = [s for m in metrics.BATCH_SIZE.collect() for s in m.samples if s.name.endswith("_count")]
    sums = [s for m in metrics.BATCH_SIZE.collect() for s in m.samples if s.name.endswith("_sum")]
    assert sums[0].value / counts[0].value > 1  # more than one request per engine call on average
