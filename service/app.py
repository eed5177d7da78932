"""The BentoML service. Thin: routes validate input and call service.runtime.Runtime.

Prediction routes are BentoML APIs; read and admin routes live on a FastAPI app mounted into the service
(BentoML's class views, so they share the worker's Runtime). Errors are JSON `{"error": message}` with a
4xx status that names the problem; nothing a client sends produces a 5xx.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import bentoml
from fastapi import FastAPI, Header, UploadFile
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from service.http import BodyLimitMiddleware

log = logging.getLogger("adaptserve")
api = FastAPI(title="adaptserve", description="Adapters, status and admin routes")


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class PromoteRequest(BaseModel):
    name: str = Field(description="adapter name")
    version: int = Field(ge=1, description="version to make champion")


class NameRequest(BaseModel):
    name: str = Field(description="adapter name")


class AdapterRequest(BaseModel):
    adapter: str = Field(description="adapter name")


class ScheduleRequest(BaseModel):
    adapter: str = Field(description="adapter name")
    cron: str = Field(description="5-field cron expression, e.g. '0 3 * * *' (03:00 every day)")


class FeedbackRequest(BaseModel):
    label: str = Field(description="the true class name")
    id: str | None = Field(default=None, description="prediction id from a /predict response")
    image: str | None = Field(default=None, description="base64 image, for a label without a prior prediction")
    adapter: str | None = Field(default=None, description="adapter the image belongs to (with `image`)")


@bentoml.service(
    name="adaptserve",
    workers=int(os.environ.get("ADAPTSERVE_WORKERS", "1")),
    traffic={"timeout": 120, "max_concurrency": 1024},
)
@bentoml.asgi_app(api, path="/")
class AdaptServe:
    def __init__(self) -> None:
        # heavy imports here, in the worker, after BentoML set up Prometheus multiprocess mode
        from pipelines.jobs import JobStore, ScheduleStore
        from pipelines.labels import LabelStore
        from service.config import ServiceConfig
        from service.decode import DecodeLimits
        from service.runtime import Runtime

        self.cfg = ServiceConfig.from_env()
        self.limits = DecodeLimits.from_env()
        self.rt = Runtime(self.cfg)
        self.labels = LabelStore(self.cfg.home)
        self.jobs = JobStore(self.cfg.home)
        self.schedules = ScheduleStore(self.cfg.home)
        self.supervisor = None

    def __is_ready__(self) -> bool:
        return self.rt is not None

    @bentoml.on_startup
    async def _start_background(self) -> None:
        asyncio.get_running_loop().create_task(self._poll())
        asyncio.get_running_loop().create_task(self._export_job_counts())
        if self.rt.monitor is not None:
            self.rt.monitor.start()  # scheduled drift checks, in one worker only (it takes a lock)
        if self.cfg.job_runner:
            from service.background import RunnerSupervisor

            env = dict(os.environ, ADAPTSERVE_HOME=str(self.cfg.home), ADAPTSERVE_BASE_MODEL=str(self.cfg.base_model))
            self.supervisor = RunnerSupervisor(self.cfg.home, env).start()

    @bentoml.on_shutdown
    def _stop_background(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
        self.rt.close()

    async def _poll(self) -> None:
        """Notice promotes/rollbacks made through any worker, the CLI or a retrain job within `poll_s` seconds."""
        while True:
            await asyncio.sleep(self.cfg.poll_s)
            try:
                await asyncio.to_thread(self.rt.refresh)
            except Exception:  # keep polling: a transient database error must not stop hot swaps
                log.exception("registry refresh failed")

    async def _export_job_counts(self) -> None:
        """Jobs run in the runner process; their counts reach Prometheus through the workers' /metrics."""
        from service import metrics

        while True:
            try:
                counts = await asyncio.to_thread(self.jobs.counts)
                for (adapter, trigger, state), n in counts.items():
                    metrics.RETRAIN_JOBS.labels(adapter=adapter, trigger=trigger, state=state).set(n)
            except Exception:
                log.exception("reading job counts failed")
            await asyncio.sleep(5.0)

    async def _predict(self, images: list[Any], adapter: str | None, top_k: int) -> dict | JSONResponse:
        from service.decode import InputError, decode_images_and_bytes
        from service.runtime import UnknownAdapterError

        try:
            decoded, blobs = await asyncio.to_thread(decode_images_and_bytes, images, self.limits)
            return await self.rt.predict(decoded, adapter, top_k, blobs)
        except InputError as err:
            return error(err.status, str(err))
        except UnknownAdapterError as err:
            return error(404, str(err))
        except ValueError as err:
            return error(400, str(err))

    @bentoml.api(route="/predict")
    async def predict(
        self,
        images: Annotated[list[Any], Field(description="base64-encoded images (PNG, JPEG, WebP, ...)")],
        adapter: Annotated[str | None, Field(description="adapter name; omitted = the base model")] = None,
        top_k: Annotated[int, Field(description="labels to return per image")] = 1,
    ) -> dict:
        """Classify images with the champion version of `adapter`."""
        return await self._predict(images, adapter, top_k)

    # --- read routes ------------------------------------------------------------------------------
    @api.get("/adapters")
    def list_adapters(self) -> dict:
        """Every adapter with its versions, champion and metrics, and what this worker serves."""
        out = []
        for info in self.rt.registry.list_adapters():
            versions = [
                {
                    "version": v.version,
                    "created_at": v.created_at,
                    "champion": v.is_champion,
                    "metrics": _summary(v.metadata),
                    "strategy": v.metadata.get("strategy"),
                }
                for v in info.versions
            ]
            out.append(
                {
                    "name": info.name,
                    "champion": info.champion,
                    "serving": self.rt.champions.get(info.name),
                    "precision": self.rt.served(info.name, self.rt.champions.get(info.name, -1)),
                    "versions": versions,
                    "error": self.rt.last_error.get(info.name),
                }
            )
        return {
            "base_model": self.rt.base_id,
            "engine": self.rt.engine.name,
            "base_precision": self.rt.served("base", 0),
            "adapters": out,
        }

    @api.post("/predict/upload")
    async def predict_upload(self, file: UploadFile, adapter: str | None = None, top_k: int = 1) -> Any:
        """One image as a multipart file upload (`curl -F file=@cat.jpg`)."""
        from service.decode import InputError, decode_upload
        from service.runtime import UnknownAdapterError

        data = await file.read()
        try:
            image = await asyncio.to_thread(decode_upload, data, self.limits)
            return await self.rt.predict([image], adapter, top_k, [data])
        except InputError as err:
            return error(err.status, str(err))
        except UnknownAdapterError as err:
            return error(404, str(err))
        except ValueError as err:
            return error(400, str(err))

    # --- admin routes -----------------------------------------------------------------------------
    def _unauthorized(self, authorization: str | None) -> JSONResponse | None:
        token = self.cfg.admin_token
        if not token:
            return error(401, "admin routes are disabled: start the service with ADAPTSERVE_ADMIN_TOKEN set")
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not authorization or not hmac.compare_digest(given.encode(), token.encode()):
            return error(401, "missing or wrong admin token: send 'Authorization: Bearer <ADAPTSERVE_ADMIN_TOKEN>'")
        return None

    def _registry_call(self, fn, *args) -> Any:
        from models.artifacts import ArtifactError
        from models.registry import AdapterNotFoundError, RegistryError

        try:
            result = fn(*args)
        except AdapterNotFoundError as err:
            return error(404, str(err))
        except (RegistryError, ArtifactError, ValueError) as err:
            return error(400, str(err))
        swaps = self.rt.refresh()  # this worker applies it now; the others within poll_s
        return {"result": _jsonable(result), "swaps": [s.__dict__ for s in swaps], "champions": self.rt.champions}

    @api.post("/adapters/promote")
    def promote(self, body: PromoteRequest, authorization: Annotated[str | None, Header()] = None) -> Any:
        return self._unauthorized(authorization) or self._registry_call(
            self.rt.registry.promote, body.name, body.version
        )

    @api.post("/adapters/rollback")
    def rollback(self, body: NameRequest, authorization: Annotated[str | None, Header()] = None) -> Any:
        return self._unauthorized(authorization) or self._registry_call(self.rt.registry.rollback, body.name)

    @api.delete("/adapters/{name}/versions/{version}")
    def delete_version(self, name: str, version: int, authorization: Annotated[str | None, Header()] = None) -> Any:
        return self._unauthorized(authorization) or self._registry_call(self.rt.registry.delete, name, version)

    @api.post("/adapters/register")
    async def register(
        self,
        name: str,
        archive: UploadFile,
        promote: bool = False,
        authorization: Annotated[str | None, Header()] = None,
    ) -> Any:
        """Upload a PEFT-format adapter directory as .zip or .tar.gz (multipart field `archive`)."""
        if denied := self._unauthorized(authorization):
            return denied
        data = await archive.read()
        return await asyncio.to_thread(self._register, name, data, promote)

    def _register(self, name: str, data: bytes, promote: bool) -> Any:
        from models.publish import extract_archive, publish

        with tempfile.TemporaryDirectory(prefix="adaptserve-upload-") as tmp:
            upload = Path(tmp) / "upload"
            upload.write_bytes(data)
            (Path(tmp) / "x").mkdir()

            def run() -> Any:
                src = extract_archive(upload, Path(tmp) / "x")
                return publish(self.rt.registry, name, src, self.cfg.base_model, promote)

            return self._registry_call(run)

    # --- labels and retraining --------------------------------------------------------------------
    @api.post("/feedback", status_code=201)
    async def feedback(self, body: FeedbackRequest) -> Any:
        """Label a served prediction by its id, or send a labelled image for an adapter."""
        return await asyncio.to_thread(self._feedback, body)

    def _feedback(self, body: FeedbackRequest) -> Any:
        from pipelines.labels import ExpiredPredictionError, LabelError
        from service.decode import InputError, decode_images

        if (body.id is None) == (body.image is None):
            return error(400, "send either 'id' (a prediction id from /predict) or 'image' (base64) with 'adapter'")
        if body.id is not None:
            try:
                adapter, _version, image = self.rt.lookup_input(body.id)
            except LookupError as err:
                return error(410 if isinstance(err, ExpiredPredictionError) else 404, str(err).strip("'\""))
            source = f"feedback:{body.id}"
        else:
            if not body.adapter:
                return error(400, "'adapter' is required with 'image': name the adapter this image belongs to")
            if body.adapter not in {i.name for i in self.rt.registry.list_adapters()}:
                return error(404, f"unknown adapter {body.adapter!r}")
            try:
                image = decode_images([body.image], self.limits)[0]
            except InputError as err:
                return error(err.status, str(err).replace("images[0]", "image"))
            adapter, source = body.adapter, "upload"
        try:
            label_id = self.labels.add(adapter, image, body.label, self.rt.classes, source, prediction_id=body.id)
        except LabelError as err:
            return error(400, str(err))
        return {"label_id": label_id, "adapter": adapter, "label": body.label, "labels": self.labels.count(adapter)}

    @api.post("/retrain", status_code=202)
    def retrain(self, body: AdapterRequest, authorization: Annotated[str | None, Header()] = None) -> Any:
        """Queue a retrain job for an adapter (the job runner process picks it up)."""
        return self._unauthorized(authorization) or self._jobs_call(
            lambda: {"job": self.jobs.submit(body.adapter, "manual", "POST /retrain").to_dict()}
        )

    @api.get("/jobs")
    def list_jobs(self, adapter: str | None = None, state: str | None = None, limit: int = 100) -> Any:
        return self._jobs_call(
            lambda: {"jobs": [j.to_dict(include_log=False) for j in self.jobs.list(adapter, state, limit)]}
        )

    @api.get("/jobs/{job_id}")
    def get_job(self, job_id: str) -> Any:
        return self._jobs_call(lambda: self.jobs.get(job_id).to_dict())

    @api.post("/schedules", status_code=201)
    def add_schedule(self, body: ScheduleRequest, authorization: Annotated[str | None, Header()] = None) -> Any:
        """Retrain `adapter` on a cron schedule (kept across restarts; run by the job runner's scheduler)."""
        return self._unauthorized(authorization) or self._jobs_call(
            lambda: self.schedules.add(body.adapter, body.cron).to_dict()
        )

    @api.get("/schedules")
    def list_schedules(self) -> Any:
        return {"schedules": [s.to_dict() for s in self.schedules.list()]}

    @api.delete("/schedules/{schedule_id}")
    def delete_schedule(self, schedule_id: str, authorization: Annotated[str | None, Header()] = None) -> Any:
        return self._unauthorized(authorization) or self._jobs_call(
            lambda: {"deleted": self.schedules.delete(schedule_id).to_dict()}
        )

    def _jobs_call(self, fn) -> Any:
        from pipelines import jobs

        try:
            return fn()
        except (jobs.DuplicateJobError, jobs.DuplicateScheduleError) as err:
            return error(409, str(err).strip("'\""))
        except (jobs.UnknownAdapterJobError, LookupError) as err:
            return error(404, str(err).strip("'\""))
        except ValueError as err:
            return error(400, str(err))

    # --- drift ------------------------------------------------------------------------------------
    def _monitor_call(self, fn) -> Any:
        from monitoring.monitor import NotEnoughRecordsError, UnknownAdapterError

        if self.rt.monitor is None:
            return error(404, "drift monitoring is off (ADAPTSERVE_MONITOR=0)")
        try:
            return fn(self.rt.monitor)
        except UnknownAdapterError as err:
            return error(404, str(err).strip("'\""))
        except NotEnoughRecordsError as err:
            return error(409, str(err))

    @api.get("/drift")
    def drift(self, adapter: str) -> Any:
        """The latest drift check of `adapter` (run on a schedule inside the service, or by POST /drift/check)."""

        def latest(monitor) -> Any:
            result = monitor.latest(adapter)
            if result is None:
                return error(404, f"no drift check has run for adapter {adapter!r} yet; POST /drift/check runs one")
            return result

        return self._monitor_call(latest)

    @api.post("/drift/check")
    async def drift_check(self, body: AdapterRequest, authorization: Annotated[str | None, Header()] = None) -> Any:
        """Run a drift check of `adapter` now and return its result."""
        if denied := self._unauthorized(authorization):
            return denied
        return await asyncio.to_thread(self._monitor_call, lambda m: m.check(body.adapter))

    @api.get("/drift/report")
    def drift_report(self, adapter: str) -> Any:
        """The latest Evidently report of `adapter` (HTML)."""
        from starlette.responses import FileResponse

        def report(monitor) -> Any:
            path = monitor.report_path(adapter)
            if path is None:
                return error(
                    404,
                    f"no Evidently report for adapter {adapter!r} yet: one is written every "
                    "ADAPTSERVE_REPORT_EVERY-th drift check",
                )
            return FileResponse(path, media_type="text/html")

        return self._monitor_call(report)

    @api.get("/dashboard")
    def dashboard(self, refresh_s: int = 10) -> Any:
        """Drift, confidence, classes, versions and retrain events per adapter; one offline HTML page that
        refreshes itself from /dashboard/data every `refresh_s` seconds (0: never)."""
        from starlette.responses import HTMLResponse

        from monitoring.dashboard import jsonable, render_dashboard
        from service.views import dashboard_data

        if refresh_s < 0:
            return error(400, f"refresh_s must be >= 0 (0 turns live refresh off), got {refresh_s}")
        live = {"refresh_s": refresh_s, "data_url": "/dashboard/data"} if refresh_s else {}
        return HTMLResponse(render_dashboard(jsonable(dashboard_data(self)), **live))

    @api.get("/dashboard/data")
    def dashboard_json(self) -> Any:
        from monitoring.dashboard import jsonable
        from service.views import dashboard_data

        return jsonable(dashboard_data(self))


AdaptServe.add_asgi_middleware(BodyLimitMiddleware)


def _summary(meta: dict) -> dict | None:
    metrics = (meta.get("metrics") or {}).get("target_test")
    if not metrics:
        return None
    return {k: metrics.get(k) for k in ("accuracy", "precision", "recall", "f1", "n")}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "version") and hasattr(value, "name"):
        return {"name": value.name, "version": value.version, "champion": getattr(value, "is_champion", None)}
    return str(value)
