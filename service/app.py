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


@bentoml.service(
    name="adaptserve",
    workers=int(os.environ.get("ADAPTSERVE_WORKERS", "1")),
    traffic={"timeout": 120, "max_concurrency": 1024},
)
@bentoml.asgi_app(api, path="/")
class AdaptServe:
    def __init__(self) -> None:
        # heavy imports here, in the worker, after BentoML set up Prometheus multiprocess mode
        from service.config import ServiceConfig
        from service.decode import DecodeLimits
        from service.runtime import Runtime

        self.cfg = ServiceConfig.from_env()
        self.limits = DecodeLimits.from_env()
        self.rt = Runtime(self.cfg)

    def __is_ready__(self) -> bool:
        return self.rt is not None

    @bentoml.on_startup
    async def _start_polling(self) -> None:
        asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        """Notice promotes/rollbacks made through any worker or the CLI within `poll_s` seconds."""
        while True:
            await asyncio.sleep(self.cfg.poll_s)
            try:
                await asyncio.to_thread(self.rt.refresh)
            except Exception:  # keep polling: a transient database error must not stop hot swaps
                log.exception("registry refresh failed")

    async def _predict(self, images: list[Any], adapter: str | None, top_k: int) -> dict | JSONResponse:
        from service.decode import InputError, decode_images
        from service.runtime import UnknownAdapterError

        try:
            decoded = await asyncio.to_thread(decode_images, images, self.limits)
            return await self.rt.predict(decoded, adapter, top_k)
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
                    "versions": versions,
                    "error": self.rt.last_error.get(info.name),
                }
            )
        return {"base_model": self.rt.base_id, "engine": self.rt.engine.name, "adapters": out}

    @api.post("/predict/upload")
    async def predict_upload(self, file: UploadFile, adapter: str | None = None, top_k: int = 1) -> Any:
        """One image as a multipart file upload (`curl -F file=@cat.jpg`)."""
        from service.decode import InputError, decode_upload
        from service.runtime import UnknownAdapterError

        data = await file.read()
        try:
            image = await asyncio.to_thread(decode_upload, data, self.limits)
            return await self.rt.predict([image], adapter, top_k)
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
