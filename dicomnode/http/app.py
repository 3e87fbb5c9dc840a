"""The HTTP application: /healthz, /metrics, the REST API and the server-rendered dashboard.

Starlette, with sync endpoints (they run in its thread pool, so a slow database read never stalls
the event loop). Everything is read-only except ``POST /api/retry/{target}``, which needs the
bearer token; the token, its check on every path and the security headers are in
:mod:`dicomnode.http.access`. URLs carry UIDs only; patient name and ID appear only in the study
page's HTML.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from dicomnode.config import Config
from dicomnode.errors import ConfigurationError
from dicomnode.http import images, queries
from dicomnode.http.access import Guard, presented_token, read_token, token_valid
from dicomnode.http.metrics_view import render_metrics
from dicomnode.http.stow import stow_routes
from dicomnode.node.process import read_runtime_state

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
REFRESH_SECONDS = 10
LISTENER_CHECK_SECONDS = 5.0  # a load balancer polling /healthz opens at most one connection per 5 s
# /api/status and /metrics are computed at most once a second, however often they are polled: a
# client polling at 10 Hz then costs the node's CPUs (shared with reception) almost nothing.
RESPONSE_CACHE_SECONDS = 1.0


class Cached:
    """The last answer of ``compute`` for ``ttl`` seconds (one computation at a time)."""

    def __init__(self, compute: Callable[[], Any], ttl: float) -> None:
        self.compute = compute
        self.ttl = ttl
        self._lock = threading.Lock()
        self._value: Any = None
        self._at = float("-inf")

    def get(self) -> Any:
        with self._lock:
            now = time.monotonic()
            if now - self._at >= self.ttl:
                self._value, self._at = self.compute(), now
            return self._value


class Node:
    """What the endpoints share: configuration, sessions, token, and the cached listener check."""

    def __init__(self, config: Config, sessions: sessionmaker[Session], *, check_listener: bool) -> None:
        self.config = config
        self.sessions = sessions
        self.check_listener = check_listener
        self.token = read_token(config.http.token_file)
        self._listener_checked = 0.0
        self._listener_answer: tuple[bool, str] = (False, "not checked")

    def listener(self) -> tuple[bool, str]:
        """Whether the DICOM listener accepts a TCP connection (cached a few seconds)."""
        now = time.monotonic()
        if now - self._listener_checked < LISTENER_CHECK_SECONDS:
            return self._listener_answer
        state = read_runtime_state(self.config)
        if state is None:
            answer = (False, "no running listener (serve.json missing or its process is gone)")
        else:
            host = str(state["host"])
            host = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
            try:
                with socket.create_connection((host, int(state["port"])), timeout=2.0):
                    answer = (True, f"{host}:{state['port']}")
            except OSError as exc:
                answer = (False, f"{host}:{state['port']} does not answer ({exc.strerror or exc})")
        self._listener_checked, self._listener_answer = now, answer
        return answer

    def database(self) -> tuple[bool, str]:
        try:
            with self.sessions() as session:
                session.execute(text("SELECT 1"))
            return True, "reachable"
        except Exception as exc:
            return False, f"unreachable ({type(exc).__name__})"


def create_app(config: Config, sessions: sessionmaker[Session], *, check_listener: bool = True) -> Starlette:
    """The application for one node (``check_listener=False`` where serve runs no listener)."""
    node = Node(config, sessions, check_listener=check_listener)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    root = config.storage.path

    def healthz(request: Request) -> Response:
        database_ok, database = node.database()
        listener_ok, listener = node.listener() if node.check_listener else (True, "not run here")
        body = {
            "status": "ok" if database_ok and listener_ok else "failing",
            "listener": {"ok": listener_ok, "detail": listener},
            "database": {"ok": database_ok, "detail": database},
        }
        if body["status"] != "ok":
            logger.warning("healthz failing: listener %s, database %s", listener, database)
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    from dicomnode.node.inventory import node_status

    cached_metrics = Cached(lambda: render_metrics(config, sessions), RESPONSE_CACHE_SECONDS)
    cached_status = Cached(lambda: JSONResponse(node_status(sessions, config)).body, RESPONSE_CACHE_SECONDS)

    def metrics(request: Request) -> Response:
        payload, content_type = cached_metrics.get()
        return Response(payload, media_type=content_type)

    def api_status(request: Request) -> Response:
        return Response(cached_status.get(), media_type="application/json")

    def api_studies(request: Request) -> Response:
        try:
            limit = int(request.query_params.get("limit", "50"))
            offset = int(request.query_params.get("offset", "0"))
        except ValueError:
            return JSONResponse({"error": "limit and offset must be integers"}, status_code=400)
        state = request.query_params.get("state") or None
        return JSONResponse(queries.studies_page(sessions, root, state=state, limit=limit, offset=offset))

    def api_study(request: Request) -> Response:
        detail = queries.study_detail(sessions, root, request.path_params["study_instance_uid"])
        if detail is None:
            return JSONResponse({"error": "no such study"}, status_code=404)
        return JSONResponse(detail)

    def api_models(request: Request) -> Response:
        return JSONResponse(installed_models(config))

    def api_retry(request: Request) -> Response:
        if node.token is None:
            return JSONResponse({"error": "retrying needs http.token_file to be configured"}, status_code=403)
        if not token_valid(presented_token(request, allow_basic=False), node.token):
            return JSONResponse({"error": "a bearer token is required"}, status_code=401)
        from dicomnode.node.inventory import retry
        from dicomnode.node.services import Services
        from dicomnode.queue.jobs import JobQueue

        target = request.path_params["target"]
        services = Services(
            config=config, engine=sessions.kw["bind"], sessions=sessions, queue=JobQueue(sessions)
        )
        jobs, deliveries = retry(services, target)
        logger.info("HTTP retry %s: requeued %d jobs and %d deliveries", target, jobs, deliveries)
        return JSONResponse(
            {"target": target, "jobs": jobs, "deliveries": deliveries},
            status_code=200 if jobs or deliveries else 404,
        )

    def dashboard(request: Request) -> Response:
        status = node_status(sessions, config)
        listener_ok, listener = node.listener() if node.check_listener else (True, "not run here")
        disk = status["disk"]
        used_percent = 100.0 * (1 - disk["free_bytes"] / disk["total_bytes"]) if disk["total_bytes"] else 0.0
        context = {
            "refresh": REFRESH_SECONDS,
            "status": status,
            "listener_ok": listener_ok,
            "listener_detail": listener,
            "overview": queries.overview(sessions),
            "associations": association_counts(),
            "disk_used_percent": used_percent,
            "watermark_percent": config.retention.high_watermark_percent,
            "can_retry": node.token is not None,
            "now": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        }
        return templates.TemplateResponse(request, "dashboard.html", context)

    def study_page(request: Request) -> Response:
        uid = request.path_params["study_instance_uid"]
        detail = queries.study_detail(sessions, root, uid)
        if detail is None:
            return templates.TemplateResponse(request, "missing.html", {"uid": uid}, status_code=404)
        pictures = study_pictures(detail)
        patient = patient_of(detail)
        context = {
            "refresh": REFRESH_SECONDS * 3,
            "study": detail,
            "pictures": pictures,
            "patient": patient,
            "can_retry": node.token is not None,
        }
        return templates.TemplateResponse(request, "study.html", context)

    def models_page(request: Request) -> Response:
        return templates.TemplateResponse(
            request, "models.html", {"refresh": 0, "models": installed_models(config)}
        )

    def key_image(request: Request) -> Response:
        path = _result_file(request, "key-image")
        if path is None:
            return PlainTextResponse("no such key image", status_code=404)
        return Response(images.key_image_png(path, path.stat().st_mtime), media_type="image/png")

    def heatmap(request: Request) -> Response:
        detail = queries.study_detail(sessions, root, request.path_params["study_instance_uid"])
        wanted = (request.path_params["sop_instance_uid"], request.path_params["label"])
        for result in detail["results"] if detail else []:
            for image in result["findings"]["images"]:
                for label, stored in image.get("heatmaps", {}).items():
                    if (image["sop_instance_uid"], label) == wanted:
                        path = images.inside(root, stored)
                        if path is not None:
                            return Response(
                                images.heatmap_png(path, path.stat().st_mtime), media_type="image/png"
                            )
        return PlainTextResponse("no such heat map", status_code=404)

    def _result_file(request: Request, kind: str) -> Path | None:
        detail = queries.study_detail(sessions, root, request.path_params["study_instance_uid"])
        sop = request.path_params["sop_instance_uid"]
        for result in detail["results"] if detail else []:
            for obj in result["objects"]:
                if obj["kind"] == kind and obj["sop_instance_uid"] == sop:
                    return images.inside(root, obj["path"])
        return None

    routes = [
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        Route("/api/status", api_status),
        Route("/api/studies", api_studies),
        Route("/api/studies/{study_instance_uid}", api_study),
        Route("/api/models", api_models),
        Route("/api/retry/{target}", api_retry, methods=["POST"]),
        Route("/", dashboard),
        Route("/models", models_page),
        Route("/studies/{study_instance_uid}", study_page),
        Route("/studies/{study_instance_uid}/key-images/{sop_instance_uid}.png", key_image),
        Route("/studies/{study_instance_uid}/heatmaps/{sop_instance_uid}/{label}.png", heatmap),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
        *stow_routes(config, sessions),  # POST /dicom-web/studies: STOW-RS receive (http/stow.py)
    ]
    return Starlette(routes=routes, middleware=[Middleware(Guard, token=node.token)])


def study_pictures(detail: dict[str, Any]) -> list[dict[str, str]]:
    """The key images and heat maps of a study's results, as URLs under the study page."""
    uid = detail["study_instance_uid"]
    pictures = []
    for result in detail["results"]:
        for obj in result["objects"]:
            if obj["kind"] == "key-image":
                pictures.append(
                    {
                        "kind": "key image",
                        "url": f"/studies/{uid}/key-images/{obj['sop_instance_uid']}.png",
                        "caption": f"{result['model_name']} {result['model_version']} key image",
                    }
                )
        for image in result["findings"]["images"]:
            for label in image.get("heatmaps", {}):
                pictures.append(
                    {
                        "kind": "heat map",
                        "url": f"/studies/{uid}/heatmaps/{image['sop_instance_uid']}/{label}.png",
                        "caption": f"{label} heat map of {image['sop_instance_uid']}",
                    }
                )
    return pictures


def patient_of(detail: dict[str, Any]) -> dict[str, str]:
    """Patient's name and ID from the first stored instance (shown in the study page only)."""
    patient = {"name": "", "id": detail.get("patient_id") or ""}
    for instance in detail["instances"][:1]:
        try:
            import pydicom

            ds = pydicom.dcmread(instance["path"], stop_before_pixels=True, specific_tags=["PatientName"])
            patient["name"] = str(ds.get("PatientName", "") or "")
        except Exception:  # a file gone by retention, or unreadable: the page still renders
            logger.debug("no patient name for the study page", exc_info=True)
    return patient


def installed_models(config: Config) -> list[dict[str, Any]]:
    """The model cards under ``models.path``, readable without torch."""
    from dicomnode.models.card import CARD_FILE_NAME, ModelCard

    models = []
    folder = config.models.path
    for card_path in sorted(folder.glob(f"*/{CARD_FILE_NAME}")) if folder.is_dir() else []:
        try:
            card = ModelCard.from_file(card_path)
        except ConfigurationError as exc:
            models.append({"folder": card_path.parent.name, "error": str(exc)})
            continue
        entry: dict[str, Any] = {
            "folder": card_path.parent.name,
            "name": card.name,
            "version": card.version,
            "display_name": card.display_name,
            "task": card.task,
            "architecture": card.architecture,
            "weights_present": (card_path.parent / card.weights).is_file(),
            "labels": [
                {"name": label.name, "display_name": label.display_name, "threshold": label.threshold}
                for label in card.labels
            ],
            "applies_to": {
                "modalities": list(card.applies_to.modalities),
                "body_parts": list(card.applies_to.body_parts),
                "views": list(card.applies_to.views),
            },
            "trained_by": card.trained_by,
            "training_data": card.training_data,
            "intended_use": card.intended_use,
            "limitations": card.limitations,
            "licence": card.licence,
            "not_for_clinical_use": card.not_for_clinical_use,
            "performance": card.performance.summary,
        }
        models.append(entry)
    return models


def association_counts() -> list[dict[str, Any]]:
    """Associations and C-STOREs by calling AE since the node started, from the metric files."""
    from dicomnode.http.metrics_view import sample_totals

    associations = sample_totals("dicomnode_associations_total", ("calling_ae_title", "outcome"))
    instances = sample_totals("dicomnode_instances_received_total", ("calling_ae_title", "status"))
    by_ae: dict[str, dict[str, Any]] = {}
    for (ae, outcome), value in associations.items():
        row = by_ae.setdefault(ae, {"calling_ae_title": ae, "associations": 0, "failed": 0, "stored": 0})
        row["associations"] += int(value)
        if outcome != "released":
            row["failed"] += int(value)
    for (ae, status), value in instances.items():
        row = by_ae.setdefault(ae, {"calling_ae_title": ae, "associations": 0, "failed": 0, "stored": 0})
        if status == "SUCCESS":
            row["stored"] += int(value)
    return sorted(by_ae.values(), key=lambda r: -int(r["associations"]))
