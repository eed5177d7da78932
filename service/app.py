"""The BentoML service. Thin: routes check the caller's role, validate input and call service.runtime.Runtime.

Prediction routes are BentoML APIs; read and admin routes live on a FastAPI app mounted into the service
(BentoML's class views, so they share the worker's Runtime). No route has a try-block: errors are classes that
carry their HTTP status, and one map (service/errors.py) answers `{"error": message}` with it, so nothing a
client sends produces a 5xx and overload is a 503 with Retry-After. Roles and tokens: service/auth.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from typing import Annotated, Any

import bentoml
from fastapi import FastAPI, Header, Query, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse

from models import settings
from models.archive import extract
from models.metadata import BASE, AdapterMeta
from models.registry import MAX_VERSION, NAME_PATTERN, AdapterVersion
from monitoring.dashboard import jsonable, render_dashboard
from pipelines.label_db import measured_accuracy
from pipelines.label_trust import Trust
from service import errors
from service.auth import Authenticator, Principal
from service.background import RunnerSupervisor
from service.http import BodyLimitMiddleware, ReadinessMiddleware
from service.views import dashboard_data
from service.watch import Serialized, follow, subscribe

log = logging.getLogger("adaptserve")
api = FastAPI(title="adaptserve", description="Adapters, status and admin routes")
api.add_middleware(errors.ErrorMiddleware)
api.add_exception_handler(RequestValidationError, errors.handle_validation)
api.add_exception_handler(StarletteHTTPException, errors.handle_http)

MAX_ID = 2**63 - 1  # SQLite's INTEGER range
AdapterName = Annotated[str, Field(pattern=NAME_PATTERN, description="adapter name")]
AdapterQuery = Annotated[str, Query(pattern=NAME_PATTERN, description="adapter name")]
Version = Annotated[int, Field(ge=1, le=MAX_VERSION, description="adapter version")]
Authorization = Annotated[str | None, Header(description="'Bearer <token>'")]


class PromoteRequest(BaseModel):
    name: AdapterName
    version: Version


class NameRequest(BaseModel):
    name: AdapterName


class AdapterRequest(BaseModel):
    adapter: AdapterName


class ScheduleRequest(BaseModel):
    adapter: AdapterName
    cron: str = Field(max_length=200, description="5-field cron expression, e.g. '0 3 * * *' (03:00 every day)")


class FeedbackRequest(BaseModel):
    label: str = Field(max_length=200, description="the true class name")
    id: str | None = Field(default=None, max_length=64, description="prediction id from a /predict response")
    image: str | None = Field(default=None, description="base64 image, for a label without a prior prediction")
    adapter: AdapterName | None = Field(default=None, description="adapter the image belongs to (with `image`)")


@bentoml.service(
    name="adaptserve",
    # BentoML takes the worker count from this decorator, so this one setting is read when the module is imported
    # (a bad value fails the import with the variable's name); every other setting is read in __init__.
    workers=settings.load().workers,
    traffic={"timeout": 120, "max_concurrency": 1024},
)
@bentoml.asgi_app(api, path="/")
class AdaptServe:
    def __init__(self) -> None:
        # heavy imports here, in the worker, after BentoML set up Prometheus multiprocess mode: the runtime loads
        # torch and ONNX Runtime, the stores torch's preprocessing; BentoML's arbiter imports this module too
        from pipelines.jobs import JobStore
        from pipelines.labels import LabelStore
        from pipelines.schedules import ScheduleStore
        from service.config import ServiceConfig
        from service.runtime import Runtime

        self.cfg = ServiceConfig.from_env()
        self.auth = Authenticator(self.cfg.home)
        self.limits = self.cfg.limits
        self.archive_limits = self.cfg.archive_limits
        self.rt = Runtime(self.cfg)
        self.labels = LabelStore(self.cfg.home)
        self.jobs = JobStore(self.cfg.home)
        self.schedules = ScheduleStore(self.cfg.home)
        self.supervisor = None
        self.changes = None  # the registry's change subscription, opened at startup (a thread of this worker)
        self.refresh = Serialized(self.rt.refresh)
        ReadinessMiddleware.probe = self.rt.readiness

    def __is_ready__(self) -> bool:
        return self.rt is not None and self.rt.readiness()[0]

    @bentoml.on_startup
    async def _start_background(self) -> None:
        self.changes = subscribe(self.cfg.home, self.cfg.notify)
        asyncio.get_running_loop().create_task(self._poll())
        asyncio.get_running_loop().create_task(self._export_job_counts())
        if self.rt.monitor is not None:
            self.rt.monitor.start()  # scheduled drift checks, in one worker only (it takes a lock)
        if self.cfg.job_runner:
            env = dict(os.environ, ADAPTSERVE_HOME=str(self.cfg.home), ADAPTSERVE_BASE_MODEL=str(self.cfg.base_model))
            self.supervisor = RunnerSupervisor(self.cfg.home, env).start()

    @bentoml.on_shutdown
    def _stop_background(self) -> None:
        if self.changes is not None:
            self.changes.close()
        if self.supervisor is not None:
            self.supervisor.stop()
        self.rt.close()

    async def _poll(self) -> None:
        """Apply promotes/rollbacks made through any worker, the CLI or a retrain job as soon as their notification
        arrives, and within `poll_s` seconds without one (service/watch.py)."""
        await follow(self.refresh, self.changes, self.cfg.poll_s)

    async def _export_job_counts(self) -> None:
        """Jobs run in the runner process; their counts reach Prometheus through the workers' /metrics."""
        from service import metrics  # prometheus_client: only after BentoML set up multiprocess mode

        while True:
            try:
                counts = await asyncio.to_thread(self.jobs.counts)
                for (adapter, trigger, state), n in counts.items():
                    metrics.RETRAIN_JOBS.labels(adapter=adapter, trigger=trigger, state=state).set(n)
            except Exception:
                log.exception("reading job counts failed")
            await asyncio.sleep(5.0)

    def _require(self, authorization: str | None, role: str, action: str) -> Principal:
        return self.auth.require(authorization, role, action)

    # --- predictions ------------------------------------------------------------------------------
    @bentoml.api(route="/predict")
    @errors.mapped
    async def predict(
        self,
        images: Annotated[list[Any], Field(description="base64-encoded images (PNG, JPEG, WebP, ...)")],
        ctx: bentoml.Context,
        adapter: Annotated[str | None, Field(description="adapter name; omitted = the base model")] = None,
        top_k: Annotated[int, Field(description="labels to return per image")] = 1,
    ) -> dict:
        """Classify images with the champion version of `adapter`."""
        from service.decode import decode_images_and_bytes  # torch (preprocessing): in the worker only

        self._require(ctx.request.headers.get("authorization"), "client", "prediction")
        decoded, blobs = await asyncio.to_thread(decode_images_and_bytes, images, self.limits)
        return await self.rt.predict(decoded, adapter, top_k, blobs)

    @api.post("/predict/upload")
    async def predict_upload(
        self,
        file: list[UploadFile],
        adapter: Annotated[str | None, Query(max_length=64)] = None,
        top_k: int = 1,
        authorization: Authorization = None,
    ) -> Any:
        """Images as multipart file parts, one or more named `file` (`curl -F file=@a.jpg -F file=@b.jpg`)."""
        from service.decode import decode_uploads  # torch (preprocessing): in the worker only

        self._require(authorization, "client", "prediction")
        blobs = [await part.read() for part in file[: self.limits.max_images + 1]]  # one past the limit says so
        images = await asyncio.to_thread(decode_uploads, blobs, self.limits)
        return await self.rt.predict(images, adapter, top_k, blobs)

    @api.post("/predict/image")
    async def predict_image(
        self,
        request: Request,
        adapter: Annotated[str | None, Query(max_length=64)] = None,
        top_k: int = 1,
        authorization: Authorization = None,
    ) -> Any:
        """One image as the raw request body (`curl --data-binary @a.jpg -H 'Content-Type: image/jpeg'`): no base64,
        no multipart; any image/* type or application/octet-stream (the bytes say the format, not the header)."""
        from service.decode import InputError, decode_upload  # torch (preprocessing): in the worker only

        self._require(authorization, "client", "prediction")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not (kind.startswith("image/") or kind == "application/octet-stream"):
            raise InputError(f"Content-Type {kind or '(none)'!r}: send image/jpeg, image/png, ... or "
                             "application/octet-stream (JSON goes to /predict, multipart to /predict/upload)",
                             status=415)
        data = await request.body()  # within ADAPTSERVE_MAX_BODY_BYTES (BodyLimitMiddleware)
        image = await asyncio.to_thread(decode_upload, data, self.limits)
        return await self.rt.predict([image], adapter, top_k, [data])

    # --- read routes ------------------------------------------------------------------------------
    @api.get("/adapters")
    def list_adapters(self, authorization: Authorization = None) -> dict:
        """Every adapter with its versions, champion and metrics, and what this worker serves (and, for an adapter
        whose champion cannot be loaded, which earlier champion serves instead and why)."""
        self._require(authorization, "client", "reading adapters")
        out = []
        for info in self.rt.registry.list_adapters():
            versions = [_version_row(v) for v in info.versions]
            degraded = self.rt.degraded.get(info.name)
            out.append(
                {
                    "name": info.name,
                    "champion": info.champion,
                    "serving": self.rt.champions.get(info.name),
                    "precision": self.rt.served(info.name, self.rt.champions.get(info.name, -1)),
                    "versions": versions,
                    "degraded": degraded.to_dict() if degraded else None,
                    "error": degraded.reason if degraded else None,
                }
            )
        return {
            "base_model": self.rt.base_id,
            "engine": self.rt.engine.name,
            "base_precision": self.rt.served(*BASE),
            "adapters": out,
        }

    # --- admin routes -----------------------------------------------------------------------------
    def _changed(self, result: Any) -> dict:
        swaps = self.refresh()  # this worker applies it now; the others when notified (within poll_s without)
        return {"result": _jsonable(result), "swaps": [s.__dict__ for s in swaps], "champions": self.rt.champions}

    @api.post("/adapters/promote")
    def promote(self, body: PromoteRequest, authorization: Authorization = None) -> Any:
        """Make a version champion, after checking every file's sha256 and that this worker loads it (409 if not:
        the champion keeps serving)."""
        self._require(authorization, "admin", "promote")
        self.rt.preflight(body.name, body.version)  # hashed and loaded just now: the registry need not hash again
        return self._changed(self.rt.registry.promote(body.name, body.version, verify=False))

    @api.post("/adapters/rollback")
    def rollback(self, body: NameRequest, authorization: Authorization = None) -> Any:
        self._require(authorization, "admin", "rollback")
        return self._changed(self.rt.registry.rollback(body.name))

    @api.delete("/adapters/{name}/versions/{version}")
    def delete_version(
        self,
        name: Annotated[str, PathParam(pattern=NAME_PATTERN)],
        version: Annotated[int, PathParam(ge=1, le=MAX_VERSION)],
        authorization: Authorization = None,
    ) -> Any:
        self._require(authorization, "admin", "delete")
        return self._changed(self.rt.registry.delete(name, version))

    @api.post("/adapters/register")
    async def register(
        self,
        name: AdapterQuery,
        archive: UploadFile,
        promote: bool = False,
        authorization: Authorization = None,
    ) -> Any:
        """Upload a PEFT-format adapter directory as .zip or .tar.gz (multipart field `archive`)."""
        self._require(authorization, "admin", "register")
        return await asyncio.to_thread(self._register, name, archive, promote)

    def _register(self, name: str, archive: UploadFile, promote: bool) -> Any:
        """Extract within the archive limits into a staging dir under the registry home (swept if this worker is
        killed), then publish: verified ONNX, drift reference, registration."""
        from pipelines.release import publish  # torch and onnx: loaded by the first registration, in the worker

        with self.rt.registry.staging() as tmp:
            upload = tmp / "upload"
            with open(upload, "wb") as fh:
                shutil.copyfileobj(archive.file, fh)
            src = extract(upload, tmp / "x", self.archive_limits)
            return self._changed(publish(self.rt.registry, name, src, self.cfg.base_model, promote))

    # --- labels and retraining --------------------------------------------------------------------
    @api.post("/feedback", status_code=201)
    async def feedback(self, body: FeedbackRequest, authorization: Authorization = None) -> Any:
        """Label a served prediction by its id, or send a labelled image for an adapter. Needs a labeller token
        (trusted labels) or a contributor token (untrusted: never in the gate's holdout); an admin's label is
        authoritative. Open to anonymous, untrusted labels only with ADAPTSERVE_FEEDBACK_OPEN=1."""
        who = self._require(authorization, "contributor", "feedback")
        return await asyncio.to_thread(self._feedback, body, who)

    def _feedback(self, body: FeedbackRequest, who: Principal) -> Any:
        from service.decode import decode_one  # torch (preprocessing): loaded in the worker, not the arbiter

        if (body.id is None) == (body.image is None):
            raise errors.BadRequestError(
                "send either 'id' (a prediction id from /predict) or 'image' (base64) with 'adapter'"
            )
        if body.id is not None:
            adapter, _version, image = self.rt.lookup_input(body.id)
            source = f"feedback:{body.id}"
        else:
            if not body.adapter:
                raise errors.BadRequestError(
                    "'adapter' is required with 'image': name the adapter this image belongs to"
                )
            if body.adapter not in {i.name for i in self.rt.registry.list_adapters()}:
                raise errors.NotFoundError(f"unknown adapter {body.adapter!r}")
            image = decode_one(body.image, self.limits)
            adapter, source = body.adapter, "upload"
        result = self.labels.add(
            adapter, image, body.label, self.rt.classes, source, prediction_id=body.id,
            trust={"admin": Trust.ADMIN, "labeller": Trust.TRUSTED}.get(who.role or "", Trust.UNTRUSTED),
            sender=who.name,
        )
        out = {"label_id": result.label_id, "adapter": adapter, "label": body.label, "outcome": result.outcome,
               "labels": self.labels.count(adapter)}
        if who.may("labeller"):  # what is stored for an image is not told to whoever merely has its pixels
            out.update(stored_label=result.stored_label, conflicted=result.conflicted)
        return out

    @api.get("/labels/conflicts")
    def label_conflicts(
        self, adapter: AdapterQuery, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        authorization: Authorization = None,
    ) -> Any:
        """Labels that contradict an earlier label of the same image (kept aside, not silently overwritten)."""
        self._require(authorization, "labeller", "reading label conflicts")
        return {"adapter": adapter, "conflicts": self.labels.conflicts(adapter, limit=limit),
                "summary": self.labels.summary(adapter)}

    @api.get("/labels/requests")
    def label_requests(
        self, adapter: AdapterQuery, n: Annotated[int, Query(ge=1, le=500)] = 20,
        images: bool = True, authorization: Authorization = None,
    ) -> Any:
        """The `n` captured predictions of `adapter` most worth a label (smallest margin, then the most different
        from each other and from what is labelled), with their images as base64 PNG; label one with
        POST /feedback {"id": ..., "label": ...}. Needs a labeller token: the images are the clients' data."""
        from service.label_requests import label_requests  # the input cache decodes with torch: worker only

        self._require(authorization, "labeller", "reading label requests")
        if adapter not in {i.name for i in self.rt.registry.list_adapters()}:
            raise errors.NotFoundError(f"unknown adapter {adapter!r}")
        if self.rt.inputs is None:
            raise errors.NotFoundError(
                "label requests need the inputs of recent predictions, and their cache is off "
                "(ADAPTSERVE_FEEDBACK_MAX_ITEMS=0)"
            )
        return label_requests(self.rt.inputs, adapter, n, images=images)

    @api.post("/retrain", status_code=202)
    def retrain(self, body: AdapterRequest, authorization: Authorization = None) -> Any:
        """Queue a retrain job for an adapter (the job runner process picks it up). While a job of the adapter runs,
        this one waits behind it; a drift or schedule job not started yet becomes this one; 409 only when a manual
        job already waits (it will train on the same labels)."""
        self._require(authorization, "admin", "retrain")
        return {"job": self.jobs.submit(body.adapter, "manual", "POST /retrain").to_dict()}

    @api.get("/jobs")
    def list_jobs(
        self,
        adapter: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
        state: Annotated[str | None, Query(max_length=32)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        authorization: Authorization = None,
    ) -> Any:
        self._require(authorization, "client", "reading jobs")
        return {"jobs": [j.to_dict(include_log=False) for j in self.jobs.list(adapter, state, limit)]}

    @api.get("/jobs/{job_id}")
    def get_job(self, job_id: Annotated[str, PathParam(max_length=64)], authorization: Authorization = None) -> Any:
        """A job; its log (which can hold paths and data) only with an admin token."""
        who = self._require(authorization, "client", "reading jobs")
        return self.jobs.get(job_id).to_dict(include_log=who.may("admin"))

    @api.post("/schedules", status_code=201)
    def add_schedule(self, body: ScheduleRequest, authorization: Authorization = None) -> Any:
        """Retrain `adapter` on a cron schedule (kept across restarts; run by the job runner's scheduler)."""
        self._require(authorization, "admin", "adding a schedule")
        return self.schedules.add(body.adapter, body.cron).to_dict()

    @api.get("/schedules")
    def list_schedules(self, authorization: Authorization = None) -> Any:
        self._require(authorization, "client", "reading schedules")
        return {"schedules": [s.to_dict() for s in self.schedules.list()]}

    @api.delete("/schedules/{schedule_id}")
    def delete_schedule(
        self, schedule_id: Annotated[int, PathParam(ge=1, le=MAX_ID)], authorization: Authorization = None
    ) -> Any:
        self._require(authorization, "admin", "deleting a schedule")
        return {"deleted": self.schedules.delete(schedule_id).to_dict()}

    # --- drift ------------------------------------------------------------------------------------
    def _monitor(self):
        if self.rt.monitor is None:
            raise errors.NotFoundError("drift monitoring is off (ADAPTSERVE_MONITOR=0)")
        return self.rt.monitor

    @api.get("/drift")
    def drift(self, adapter: AdapterQuery, authorization: Authorization = None) -> Any:
        """The latest drift check of `adapter` (run on a schedule inside the service, or by POST /drift/check), with
        the accuracy estimated without labels for its window and the accuracy the labels measure for its version."""
        self._require(authorization, "client", "reading drift")
        result = self._monitor().latest(adapter)
        if result is None:
            raise errors.NotFoundError(
                f"no drift check has run for adapter {adapter!r} yet; POST /drift/check runs one"
            )
        if adapter != BASE[0]:
            result["measured_accuracy"] = measured_accuracy(self.labels.database, adapter, result["version"])
        return result

    @api.post("/drift/check")
    async def drift_check(self, body: AdapterRequest, authorization: Authorization = None) -> Any:
        """Run a drift check of `adapter` now and return its result."""
        self._require(authorization, "admin", "a drift check")
        return await asyncio.to_thread(self._monitor().check, body.adapter)

    @api.get("/drift/report")
    def drift_report(self, adapter: AdapterQuery, authorization: Authorization = None) -> Any:
        """The latest Evidently report of `adapter` (HTML)."""
        self._require(authorization, "client", "reading drift reports")
        path = self._monitor().report_path(adapter)
        if path is None:
            raise errors.NotFoundError(
                f"no Evidently report for adapter {adapter!r} yet: one is written every "
                "ADAPTSERVE_REPORT_EVERY-th drift check"
            )
        return FileResponse(path, media_type="text/html")

    @api.get("/dashboard")
    def dashboard(
        self, refresh_s: Annotated[int, Query(le=86400)] = 10, authorization: Authorization = None
    ) -> Any:
        """Drift, confidence, classes, versions and retrain events per adapter; one offline HTML page that
        refreshes itself from /dashboard/data every `refresh_s` seconds (0: never)."""
        self._require(authorization, "client", "the dashboard")
        if refresh_s < 0:
            raise errors.BadRequestError(f"refresh_s must be >= 0 (0 turns live refresh off), got {refresh_s}")
        live = {"refresh_s": refresh_s, "data_url": "/dashboard/data"} if refresh_s else {}
        return HTMLResponse(render_dashboard(jsonable(dashboard_data(self)), **live))

    @api.get("/dashboard/data")
    def dashboard_json(self, authorization: Authorization = None) -> Any:
        self._require(authorization, "client", "the dashboard")
        return jsonable(dashboard_data(self))


AdaptServe.add_asgi_middleware(BodyLimitMiddleware)
AdaptServe.add_asgi_middleware(ReadinessMiddleware)


def _version_row(v: AdapterVersion) -> dict:
    meta = v.meta
    return {
        "version": v.version,
        "created_at": v.created_at,
        "champion": v.is_champion,
        "metrics": _summary(meta),
        "strategy": meta.strategy,
    }


def _summary(meta: AdapterMeta) -> dict | None:
    scores = meta.scores("target_test")
    if not scores:
        return None
    return {k: scores.get(k) for k in ("accuracy", "precision", "recall", "f1", "n")}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "version") and hasattr(value, "name"):
        return {"name": value.name, "version": value.version, "champion": getattr(value, "is_champion", None)}
    return str(value)
