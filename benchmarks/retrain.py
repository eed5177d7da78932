"""`adaptserve bench retrain`: does feedback + a retrain job win back what a domain shift cost?

The embedded task, in process and in a temporary state dir:
1. the source model (pretrained into the temp dir unless --base is given) and a site adapter: a LoRA briefly
   trained on clean digits, published and promoted (a real champion);
2. the site's camera degrades (--shift, --severity): the served stream is the shifted digits train+val split;
   every input goes through the feedback input cache, and a fraction of predictions get a feedback label
   (through `InputCache.get` + `LabelStore.add`, as `POST /feedback {"id", "label"}` does), at most --max-labels;
3. `retrain()` runs the job (labels + source replay, gate, publish, promote);
4. the champion is measured before and after on the shifted digits test split (which no model and no label
   saw) and on the clean source test split.

The last stdout line is one JSON object; the results also go to benchmarks/results/retrain.{md,json}.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer

from benchmarks.machine import cpu_model
from benchmarks.output import write_record
from models.artifacts import load_adapter_model, load_model, save_adapter
from models.export import merged_classifier
from models.metadata import AdapterMeta
from models.preprocessing import parse_augment
from models.registry import AdapterRegistry, open_registry
from models.samples import sample_path, save_image_set
from monitoring.capture import CaptureStore, make_records
from monitoring.image_stats import batch_image_stats
from monitoring.reference import forward
from pipelines.adapt import pretrain
from pipelines.data import DataSplits, ImageSet, digits_splits
from pipelines.evaluate import evaluate
from pipelines.label_trust import Trust
from pipelines.labels import LabelStore
from pipelines.release import publish
from pipelines.retrain import (
    RetrainConfig,
    RetrainResult,
    challenger_from,
    job_threads,
    retrain,
    split_labels,
    torch_threads,
)
from pipelines.shifts import SHIFTS, shift_set
from pipelines.train import TrainConfig, fit, seed_everything
from service.inputs import InputCache
from service.label_requests import label_requests

TARGETS = {"recovered_fraction": 0.9, "max_labels": 500, "max_source_drop_points": 1.0, "max_job_seconds": 180.0}


@dataclass
class BenchConfig:
    shift: str = field(default="gaussian_noise", metadata={"help": "domain shift (pipelines/shifts.py)"})
    severity: int = field(default=3, metadata={"help": "shift severity 1..5"})
    feedback_fraction: float = field(default=0.35, metadata={"help": "fraction of shifted predictions labelled"})
    max_labels: int = field(default=500, metadata={"help": "at most this many feedback labels"})
    champion_epochs: int = field(default=2, metadata={"help": "epochs of the site champion's clean training"})
    test_draws: int = field(
        default=3,
        metadata={"help": "shifted test set = the digits test split under this many independent shift draws"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the shift, the labelled sample and training"})
    labels: str = field(default="random", metadata={"help": "which predictions get labels: random | requested"})


def _clean_champion(
    base_dir: Path, registry: AdapterRegistry, work: Path, clean: ImageSet, cfg: RetrainConfig, epochs: int
) -> int:
    """The site's current champion: a LoRA (the retrain config's rank/targets) trained briefly on clean digits."""
    base, meta = load_model(base_dir)
    prep = meta.preprocessing
    seed_everything(cfg.seed)
    adaptation = challenger_from(base, None, cfg)
    train, val = split_labels(clean, 0.2, cfg.seed)
    fit(
        adaptation,
        train.with_transform(prep.train_transform(parse_augment(cfg.augment))),
        val.with_transform(prep.eval_transform()),
        TrainConfig(epochs=epochs, batch_size=cfg.batch_size, seed=cfg.seed),
    )
    adapter_meta = AdapterMeta.for_base(meta, config={"bench": "clean site champion"})
    out = save_adapter(adaptation.model.cpu(), adapter_meta, work / "champion")
    save_image_set(sample_path(out, "reference"), clean)
    return publish(registry, "site", out, base_dir, promote=True).version


def _accuracy(registry: AdapterRegistry, base_dir: Path, dataset: ImageSet) -> float:
    """The champion of "site" (as the registry serves it) on `dataset`."""
    base, meta = load_model(base_dir)
    champion = registry.champion("site")
    path = registry.load_check("site", champion.version).path  # verified (and fetched when this home has no copy)
    model, _ = load_adapter_model(path, copy.deepcopy(base), meta)
    return evaluate(model, dataset.with_transform(meta.preprocessing.eval_transform()), list(meta.classes)).accuracy


def _feedback(home: Path, stream: ImageSet, cfg: BenchConfig, version: int, base_dir: Path | None = None) -> int:
    """Serve the stream through the input cache; label min(max_labels, feedback_fraction x stream) predictions by
    prediction id, as POST /feedback: a seeded random sample (labels "random"), or the ones GET /labels/requests
    asks for (labels "requested": the champion's captured predictions, margin sampling + k-center greedy)."""
    cache, store = InputCache(home), LabelStore(home)
    ids = [f"bench-{cfg.seed}-{i:05d}" for i in range(len(stream))]
    for a in range(0, len(ids), 64):  # request batches, as the service's background thread stores them
        cache.put_many("site", version, ids[a : a + 64], stream.images[a : a + 64])
    n = min(cfg.max_labels, int(round(cfg.feedback_fraction * len(stream))))
    if cfg.labels == "requested":
        _capture(home, stream, ids, version, base_dir)
        wanted = {r["id"] for r in label_requests(cache, "site", n, images=False)["requests"]}
        chosen = [i for i, pid in enumerate(ids) if pid in wanted]
    else:
        chosen = np.sort(np.random.default_rng(cfg.seed).permutation(len(stream))[:n]).tolist()
    for i in chosen:
        adapter, _, image = cache.get(ids[i])
        store.add(adapter, image, stream.classes[stream.labels[i]], stream.classes, "feedback", prediction_id=ids[i],
                  trust=Trust.TRUSTED, sender="bench:labeller")  # the site's own labeller: trusted
    return store.count("site")


def _capture(home: Path, stream: ImageSet, ids: list[str], version: int, base_dir: Path | None) -> None:
    """The champion's capture records of the stream, as the service's monitor writes them (embeddings, margins)."""
    assert base_dir is not None, "requested labels need the base model to run the champion"
    registry = open_registry(home)
    base, meta = load_model(base_dir)
    model, _ = load_adapter_model(registry.load_check("site", version).path, copy.deepcopy(base), meta)
    probs, embeddings = forward(merged_classifier(model), stream.images, meta.preprocessing)
    with CaptureStore(home, max_per_adapter=len(ids) + 10) as capture:
        capture.add_many(make_records("site", version, ids, embeddings, batch_image_stats(stream.images), probs,
                                      stream.classes))


def _stream(digits: DataSplits, cfg: BenchConfig) -> ImageSet:
    """What the site serves after the shift: the digits train+val images, shifted (the test digits stay unseen)."""
    both = ImageSet(digits.train.images + digits.val.images, digits.train.labels + digits.val.labels, digits.classes)
    return shift_set(both, cfg.shift, cfg.severity, seed=cfg.seed)


def _timed_retrain(
    home: Path, base_dir: Path, retrain_cfg: RetrainConfig, say: Callable[[str], None]
) -> tuple[RetrainResult, float, float]:
    """(the job's result, its wall seconds, its CPU seconds)."""
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    result = retrain(home, "site", base_dir=base_dir, cfg=retrain_cfg, progress=_say_progress(say))
    return result, time.perf_counter() - wall0, _cpu_seconds() - cpu0


def source_model(base_dir: Path | None, work: Path, retrain_cfg: RetrainConfig, say: Callable[[str], None]) -> Path:
    """`base_dir`, or the embedded source model pretrained under `work` when none is given."""
    if base_dir is not None:
        return base_dir
    say("pretraining the embedded source model into a temp dir (about a minute on 2 idle cores)")
    with torch_threads(job_threads(retrain_cfg.threads)):
        return pretrain(work / "digits-resnet18")[0]


def run_bench(
    base_dir: Path | None,
    cfg: BenchConfig,
    retrain_cfg: RetrainConfig | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The whole benchmark in a temp dir; returns the result row (see `_summary`)."""
    retrain_cfg = retrain_cfg or RetrainConfig(seed=cfg.seed)
    with tempfile.TemporaryDirectory(prefix="adaptserve-bench-retrain-") as tmp:
        work = Path(tmp)
        base_dir = source_model(base_dir, work, retrain_cfg, say)
        home, digits = work / "home", digits_splits(32, seed=0)
        registry = open_registry(home)
        say("training and promoting the site's clean champion")
        with torch_threads(job_threads(retrain_cfg.threads)):
            version = _clean_champion(base_dir, registry, work, digits.val, retrain_cfg, cfg.champion_epochs)
        tests = {"clean": digits.test, "shifted": _shifted_test(digits.test, cfg)}
        before = {k: _accuracy(registry, base_dir, d) for k, d in tests.items()}
        labels = _feedback(home, _stream(digits, cfg), cfg, version, base_dir)
        say(f"champion v{version}: clean {before['clean']:.3f}, shifted {before['shifted']:.3f}; {labels} labels")
        result, seconds, cpu = _timed_retrain(home, base_dir, retrain_cfg, say)
        say(result.reason)
        after = {k: _accuracy(registry, base_dir, d) for k, d in tests.items()}
    return _summary(cfg, before, after, labels, (seconds, cpu), result, len(tests["shifted"]))


def _shifted_test(test: ImageSet, cfg: BenchConfig) -> ImageSet:
    """The test split under `test_draws` independent draws of the shift (random noise, rotation sign): 359 test
    digits give 0.28-point steps, too coarse to measure a 90% recovery of a ~5-point loss; 3 draws give 1077."""
    draws = [shift_set(test, cfg.shift, cfg.severity, seed=cfg.seed + 1000 + k) for k in range(cfg.test_draws)]
    return ImageSet(sum((d.images for d in draws), []), sum((d.labels for d in draws), []), test.classes)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _say_progress(say: Callable[[str], None]) -> Callable[[float, str], None]:
    """A progress callback for the job that says one line per tenth done."""
    last = [-1]

    def progress(fraction: float, message: str) -> None:
        if int(fraction * 10) != last[0]:
            last[0] = int(fraction * 10)
            say(f"  [{100 * fraction:3.0f}%] {message}")

    return progress


def _summary(
    cfg: BenchConfig, before: dict, after: dict, labels: int, times: tuple, result: RetrainResult, shifted_n: int
) -> dict[str, Any]:
    """The result row: accuracies before/after, the share of the shift's loss recovered, the job's cost, targets."""
    clean, shifted, retrained, source_after = before["clean"], before["shifted"], after["shifted"], after["clean"]
    lost = clean - shifted
    recovered = (retrained - shifted) / lost if lost > 0 else float("nan")
    row = {
        "clean_acc": round(clean, 4),
        "shifted_acc": round(shifted, 4),
        "retrained_acc": round(retrained, 4),
        "source_acc_before": round(clean, 4),
        "source_acc_after": round(source_after, 4),
        "labels_used": labels,
        "job_seconds": round(times[0], 1),
        "promoted": result.promoted,
        "recovered_fraction": round(recovered, 3) if lost > 0 else None,  # nothing lost, nothing to recover
        "job_cpu_seconds": round(times[1], 1),
        "status": result.status,
        "gate": result.numbers,
        "reason": result.reason,
        "shift": cfg.shift,
        "severity": cfg.severity,
        "shifted_test_images": shifted_n,
    }
    row["targets_met"] = {
        "recovered_90pct": bool(lost > 0 and recovered >= TARGETS["recovered_fraction"]),
        "labels_at_most_500": labels <= TARGETS["max_labels"],
        "source_within_1_point": bool(100 * (clean - source_after) <= TARGETS["max_source_drop_points"]),
        "job_under_3_minutes": times[0] < TARGETS["max_job_seconds"],
    }
    return row


def _pct(fraction: float | None) -> str:
    return "n/a (no loss)" if fraction is None else f"{100 * fraction:.0f}%"


def _machine() -> dict[str, Any]:
    """Where the job ran: the CPU and the torch threads it trained with decide its wall seconds."""
    return {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def write_results(
    row: dict[str, Any], cfg: BenchConfig, retrain_cfg: RetrainConfig, out: Path, command: str
) -> tuple[Path, Path]:
    """retrain.json (the row with its command, date, machine and both configs) and retrain.md; returns (md, json)."""
    record = {
        "command": command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "bench": asdict(cfg),
        "retrain": retrain_cfg.to_dict(),
        "targets": TARGETS,
        "result": row,
    }
    return write_record(out, "retrain", record, _markdown(record))


def _markdown(rec: dict[str, Any]) -> str:
    r, m, g = rec["result"], rec["machine"], rec["result"]["gate"]
    ok = {True: "yes", False: "**no**"}
    met = r["targets_met"]
    return "\n".join(
        [
            "# Retraining on feedback labels after a domain shift",
            "",
            f"`{rec['command']}` on {rec['date']}; {m['processor']}, {m['cpu_count']} cores, torch {m['torch']} "
            f"({m['torch_threads']} threads), load average at the end {m['load_average_at_end']}.",
            "",
            f"Embedded digits task: the site champion (a LoRA trained briefly on clean digits) serves a stream that "
            f"becomes `{r['shift']}` severity {r['severity']}; {r['labels_used']} predictions get a feedback label "
            "(by prediction id); one retrain job (labels + source replay, champion/challenger gate) runs. Shifted "
            f"accuracies are on the digits test split under {rec['bench']['test_draws']} independent shift draws "
            f"({r['shifted_test_images']} images; no model and no label saw these digits), clean and source "
            f"accuracies on the clean test split ({r['shifted_test_images'] // rec['bench']['test_draws']} images; "
            "the gate's source holdout, never trained on).",
            "",
            "The machine is shared: other work ran beside the benchmark (load average above), so wall seconds are an "
            "upper bound for an idle 2-core machine. The job picks its torch threads from the free cores "
            "(`RetrainConfig.threads`, 0 = auto): two OpenMP threads on two busy cores spin-wait for each other and "
            "train ~8x slower than one.",
            "",
            "| measure | value |",
            "|---|---:|",
            f"| clean accuracy (champion before the shift) | {100 * r['clean_acc']:.1f}% |",
            f"| shifted accuracy (same champion, shifted test) | {100 * r['shifted_acc']:.1f}% |",
            f"| retrained accuracy (champion after the job, shifted test) | {100 * r['retrained_acc']:.1f}% |",
            f"| share of the shift's loss recovered | {_pct(r['recovered_fraction'])} |",
            f"| source accuracy before / after | {100 * r['source_acc_before']:.1f}% / "
            f"{100 * r['source_acc_after']:.1f}% |",
            f"| labels used (train / gate holdout) | {r['labels_used']} "
            f"({g['labels_train']} / {g['labels_holdout']}) |",
            f"| replay images | {g['replay']} |",
            f"| job wall seconds (CPU seconds; torch threads) | {r['job_seconds']} ({r['job_cpu_seconds']}; "
            f"{g['threads']}) |",
            f"| epochs run (best) | {g['epochs_run']} ({g['best_epoch']}) |",
            f"| gate | {r['reason']} |",
            "",
            "## Targets",
            "",
            f"- recover >= 90% of the accuracy lost to the shift: {ok[met['recovered_90pct']]}",
            f"- with at most 500 labels: {ok[met['labels_at_most_500']]}",
            f"- source accuracy within 1 point: {ok[met['source_within_1_point']]}",
            f"- job under 3 minutes: {ok[met['job_under_3_minutes']]}",
            "",
        ]
    )


def command(
    base: Annotated[Path | None, typer.Option(help="source model dir [default: pretrain one into a temp dir]")] = None,
    shift: Annotated[
        str, typer.Option(help="gaussian_noise, defocus_blur, contrast, brightness, rotation, invert; a comma list, "
                          "or all")
    ] = ("gaussian_noise"),
    severity: Annotated[str, typer.Option(help="shift severity 1..5, or a comma list (3,5)")] = "3",
    feedback_fraction: Annotated[float, typer.Option(help="fraction of shifted predictions labelled")] = 0.35,
    max_labels: Annotated[int, typer.Option(help="at most this many feedback labels")] = 500,
    labels: Annotated[str, typer.Option(help="which predictions get labels: random, requested (GET "
                                        "/labels/requests), or both (each case twice)")] = "random",
    epochs: Annotated[int | None, typer.Option(help="retrain epochs [default: RetrainConfig's]")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    test_draws: Annotated[int, typer.Option(min=1, help="independent shift draws of the test split")] = 3,
    out: Annotated[Path, typer.Option(help="where retrain.md / retrain.json go")] = Path("benchmarks/results"),
) -> None:
    """Benchmark feedback + retraining on the embedded task: shift, labels, retrain job, recovery, forgetting.
    One case writes retrain.md; several (--shift all, --severity 3,5, --labels both) write retrain-cases.md."""
    from benchmarks import retrain_cases  # it imports this module

    shifts = list(SHIFTS) if shift == "all" else [s.strip() for s in shift.split(",") if s.strip()]
    levels = [int(s) for s in severity.split(",") if s.strip()]
    strategies = ["requested", "random"] if labels == "both" else [labels]
    unknown = [s for s in shifts if s not in SHIFTS] + [s for s in strategies if s not in ("random", "requested")]
    if unknown or not all(1 <= v <= 5 for v in levels):
        raise typer.BadParameter(f"unknown shift or label strategy {unknown}, or a severity outside 1..5: {levels}")
    retrain_cfg = RetrainConfig(seed=seed)
    if epochs is not None:
        retrain_cfg = replace(retrain_cfg, epochs=epochs)
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731 - stdout is for the JSON line
    line = (
        f"adaptserve bench retrain --shift {shift} --severity {severity} --feedback-fraction {feedback_fraction} "
        f"--max-labels {max_labels} --labels {labels} --seed {seed} --test-draws {test_draws}"
        + (f" --epochs {epochs}" if epochs is not None else "")
        + (f" --base {base}" if base is not None else "")
    )
    cfg = BenchConfig(shifts[0], levels[0], feedback_fraction, max_labels, seed=seed, test_draws=test_draws,
                      labels=strategies[0])
    if len(shifts) == len(levels) == len(strategies) == 1:
        row = run_bench(base, cfg, retrain_cfg, say)
        md, js = write_results(row, cfg, retrain_cfg, out, line)
        say(f"wrote {md} and {js}")
        summary = retrain_cases.summarize([row])
        print(json.dumps({k: v for k, v in row.items() if k != "gate"} | summary), flush=True)
        return
    result = retrain_cases.run_cases(base, shifts, levels, strategies, cfg, retrain_cfg, say)
    record = {"command": line, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": _machine(),
              "bench": asdict(cfg), "retrain": retrain_cfg.to_dict(), "targets": retrain_cases.CASE_TARGETS,
              "strategies": strategies, "result": result}
    md, js = write_record(out, "retrain-cases", record, retrain_cases.markdown(record))
    say(f"wrote {md} and {js}")
    cases = [{k: v for k, v in r.items() if k != "gate"} for r in result["cases"]]
    print(json.dumps(result[strategies[0]] | {"labels": strategies[0], "cases": cases}
                     | {s: result[s] for s in strategies[1:]}), flush=True)


if __name__ == "__main__":
    typer.run(command)
