"""The label-poisoning attack, re-run end to end against a real `adaptserve serve` (issue 11, point 2).

Measured before: 1,200 predictions of inverted digits relabelled `(true + 1) % 10` by an unauthenticated client
started a drift job by itself, the gate's target holdout came from the same poisoned labels and v2 was promoted
(it gave the attacker's label to 99% of unseen inverted digits). This script replays it in two settings:

1. defaults: feedback without a token is refused (401); nothing is stored, no job starts;
2. feedback opened to anonymous labels (ADAPTSERVE_FEEDBACK_OPEN=1), with a trusted holdout of correctly
   labelled inverted digits imported by the operator (`adaptserve data add`): the drift policy starts its job,
   the gate grades on the trusted holdout and rejects the challenger, and the served model does not change.

Run: `.venv/bin/python benchmarks/poisoning.py` (about 5 minutes on 2 cores). Writes
benchmarks/results/poisoning.md and .json.
"""

from __future__ import annotations

import io
import json
import platform
import sys
import tarfile
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# run as a script (`python benchmarks/poisoning.py`): the project's packages are importable only from here on
from benchmarks.demo import DEMO_ENV, png_b64, train_site_adapter  # noqa: E402
from benchmarks.output import RESULTS, write_record  # noqa: E402
from benchmarks.serve_process import ServeProcess  # noqa: E402
from models import paths, settings  # noqa: E402
from pipelines.data import digits_splits, write_image_folder  # noqa: E402
from pipelines.labels import LabelStore  # noqa: E402
from pipelines.shifts import shift_set  # noqa: E402

TOKEN = "poisoning-bench-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
N_POISON = 1200


def _register(url: str, adapter_dir: Path) -> None:
    """POST the adapter as a tar.gz to /adapters/register as "site", promoted."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(adapter_dir, arcname="adapter")
    r = httpx.post(f"{url}/adapters/register", params={"name": "site", "promote": "true"}, headers=AUTH,
                   files={"archive": ("a.tar.gz", buf.getvalue())}, timeout=300)
    r.raise_for_status()


def _accuracy(url: str, images, labels, target) -> tuple[float, set[int]]:
    """Share of images answered with `target(label)`, and the versions that answered."""
    hits, versions = 0, set()
    for i in range(0, len(images), 16):
        r = httpx.post(f"{url}/predict", json={"images": [png_b64(im) for im in images[i:i + 16]], "adapter": "site"},
                       timeout=60).json()
        versions.add(r["version"])
        hits += sum(p["label"] == str(target(y)) for p, y in zip(r["predictions"], labels[i:i + 16], strict=True))
    return hits / len(images), versions


def _attack(url: str, pool) -> dict[int, int]:
    """Predict N_POISON inverted digits and relabel each (true+1) % 10 without a token; status counts."""
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(0, N_POISON, 8):
            idx = [(i + j) % len(pool.images) for j in range(8)]
            body = {"images": [png_b64(pool.images[k]) for k in idx], "adapter": "site"}
            r = client.post("/predict", json=body).json()
            for p, k in zip(r["predictions"], idx, strict=True):
                s = client.post("/feedback", json={"id": p["id"], "label": str((pool.labels[k] + 1) % 10)}).status_code
                statuses[s] = statuses.get(s, 0) + 1
    return statuses


def _wait_for_job(url: str, timeout: float) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = httpx.get(f"{url}/jobs", params={"adapter": "site"}, timeout=30).json()["jobs"]
        done = [j for j in jobs if j["state"] in ("succeeded", "rejected", "failed")]
        if done:
            return httpx.get(f"{url}/jobs/{done[0]['id']}", headers=AUTH, timeout=30).json()
        time.sleep(2)
    return None


def run_case(name: str, work: Path, base: Path, adapter: Path, open_feedback: bool) -> dict:
    """One setting of the attack against a service of its own; what it stored, started and served after."""
    home = work / name / "home"
    home.mkdir(parents=True)
    env = {"ADAPTSERVE_HOME": str(home), "ADAPTSERVE_BASE_MODEL": str(base), "ADAPTSERVE_ADMIN_TOKEN": TOKEN,
           **DEMO_ENV}
    if open_feedback:
        env["ADAPTSERVE_FEEDBACK_OPEN"] = "1"
    digits = digits_splits(32)
    pool = shift_set(digits.train, "invert", 5, seed=1)  # the attacker's traffic
    unseen = shift_set(digits.test, "invert", 5, seed=2)  # held out from everything
    with ServeProcess(env, work / name / "serve", cli=True) as server:
        _register(server.url, adapter)
        if open_feedback:  # the operator's trusted holdout: correctly labelled inverted digits (`data add`)
            folder = write_image_folder({"val": shift_set(digits.val, "invert", 5, seed=3)}, work / name / "trusted")
            LabelStore(home).import_folder("site", folder, digits.classes)
        before, _ = _accuracy(server.url, unseen.images, unseen.labels, lambda y: (y + 1) % 10)
        started = time.monotonic()
        statuses = _attack(server.url, pool)
        job = _wait_for_job(server.url, 420) if open_feedback else None
        after, versions = _accuracy(server.url, unseen.images, unseen.labels, lambda y: (y + 1) % 10)
        clean, _ = _accuracy(server.url, digits.test.images, digits.test.labels, lambda y: y)
        champion = next(a for a in httpx.get(f"{server.url}/adapters").json()["adapters"] if a["name"] == "site")
    return {
        "case": name,
        "feedback_statuses": statuses,
        "labels_stored": LabelStore(home).summary("site")["per_trust"],
        "job": None if job is None else {k: job.get(k) for k in ("state", "trigger", "reason", "error")}
        | {"gate": (job.get("result") or {}).get("numbers")},
        "attacker_label_rate_before": round(before, 4),
        "attacker_label_rate_after": round(after, 4),
        "clean_accuracy_after": round(clean, 4),
        "versions_serving_after": sorted(versions),
        "champion_after": champion["champion"],
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> int:
    """Both cases, then poisoning.json and .md in benchmarks/results; exit 1 when either served a new champion."""
    base = settings.load().base_model or paths.default_model_dir()
    if not (base / "model.json").is_file():
        raise SystemExit(f"no base model at {base}: run `adaptserve pretrain` or set ADAPTSERVE_BASE_MODEL")
    results = []
    with tempfile.TemporaryDirectory(prefix="adaptserve-poisoning-") as tmp:
        work = Path(tmp)
        adapter = train_site_adapter(base, work / "site-adapter", epochs=3, seed=0)
        results.append(run_case("closed-by-default", work, base, adapter, open_feedback=False))
        results.append(run_case("open-feedback-trusted-holdout", work, base, adapter, open_feedback=True))
    meta = {"command": "python benchmarks/poisoning.py", "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()}"}
    write_record(RESULTS, "poisoning", {**meta, "results": results}, _markdown(meta, results))
    print(json.dumps(results))
    return 0 if all(r["champion_after"] == 1 for r in results) else 1


def _markdown(meta: dict, results: list[dict]) -> str:
    """poisoning.md: one table row per case, then the gate's numbers of each case that ran a job."""
    lines = ["# Label poisoning, re-run end to end", "", f"`{meta['command']}` on {meta['date']} ({meta['machine']})",
             "", __doc__.split("\n\n")[1], "", "| case | feedback answers | labels stored | job | attacker's label on "
             "unseen inverted digits (before -> after) | clean accuracy after | champion after |", "|---|---|---|---|"
             "---|---|---|"]
    for r in results:
        job = "none" if r["job"] is None else f"{r['job']['state']} ({r['job']['trigger']})"
        lines.append(f"| {r['case']} | {r['feedback_statuses']} | {r['labels_stored']} | {job} | "
                     f"{r['attacker_label_rate_before']:.3f} -> {r['attacker_label_rate_after']:.3f} | "
                     f"{r['clean_accuracy_after']:.3f} | v{r['champion_after']} |")
    for r in results:
        if r["job"] and r["job"]["gate"]:
            lines += ["", f"Gate numbers ({r['case']}):", "", "```", json.dumps(r["job"]["gate"], indent=1), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
