"""The dashboard's web application: pages (templates filled in by ``static/app.js`` from the
JSON API, polled, so they update without a reload), the JSON API (the documents that the
CLI's ``--json`` prints), ``/metrics`` for Prometheus, and token-guarded actions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from tuneq.schemas.errors import JobNotFound, JobStateError, ModelNotFound, TuneqError
from tuneq.schemas.settings import Settings
from tuneq.schemas.specs import parse_spec
from tuneq.schemas.statuses import JobStatus
from tuneq.ui.guard import Refused, allowed_hosts, check_action
from tuneq.ui.metrics import metrics_text, queue_registry
from tuneq.worker import store
from tuneq.worker.store.db import get_engine
from tuneq.worker.store.groups import list_groups
from tuneq.worker.store.stats import job_counts
from tuneq.worker.store.workers import live_workers
from tuneq.worker.views.documents import (
    estimate_json,
    job_detail,
    job_json,
    model_json,
    worker_json,
)
from tuneq.worker.views.eta import active_jobs, queue_estimates
from tuneq.worker.views.report import build_report
from tuneq.worker.views.sweep import compare_rows, ranking, spec_as_run, varied_fields

HERE = Path(__file__).parent
LOOPBACK = "127.0.0.1"
PAGE_LIMIT = 200  # jobs a list answers with unless asked for more
# Pages run only our own script and style; the reports add inline styles and images.
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
REPORT_POLICY = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'none'"
)
PAGES = {
    "/": ("queue", "Queue"),
    "/jobs": ("jobs", "Jobs"),
    "/groups": ("groups", "Groups"),
    "/models": ("models", "Models"),
    "/workers": ("workers", "Workers"),
}


def create_app(
    settings: Settings, *, token: str, engine: Engine | None = None, listen_host: str = LOOPBACK
) -> Starlette:
    """The dashboard over ``settings.database_url``, listening on ``listen_host``; actions
    need ``token``."""
    db = engine or get_engine(settings.database_url)
    interval_s = settings.reap_interval_s
    public = settings.ui_hosts
    templates = Jinja2Templates(directory=HERE / "templates")  # autoescapes .html
    registry = queue_registry(db, interval_s=interval_s)

    def page(name: str, title: str) -> Callable[[Request], Response]:
        def render(request: Request) -> Response:
            context = {"page": name, "title": title, "nav": PAGES.values(),
                       "key": request.path_params.get("key", "")}  # fmt: skip
            return templates.TemplateResponse(request, "page.html", context)

        return render

    def overview(request: Request) -> dict[str, Any]:
        active = active_jobs(db)
        estimates = queue_estimates(db, interval_s=interval_s, active=active)
        counts: dict[str, int] = {}
        for status, _kind, _queue, count in job_counts(db):
            counts[status] = counts.get(status, 0) + count
        return {
            "counts": counts,
            "queue": [estimate_json(e) for e in estimates],
            "jobs": {job.id: job_json(job) for job in active},
        }

    def queue(request: Request) -> list[dict[str, Any]]:
        return [estimate_json(e) for e in queue_estimates(db, interval_s=interval_s)]

    def jobs(request: Request) -> list[dict[str, Any]]:
        query = request.query_params
        status = query.get("status") or None
        if status and status not in {s.value for s in JobStatus}:
            raise BadRequest(f"status must be one of {', '.join(s.value for s in JobStatus)}")
        rows = store.list_jobs(
            db,
            limit=int_param(query.get("limit"), PAGE_LIMIT),
            status=status,
            group_id=query.get("group") or None,
            kind=query.get("kind") or None,
            model=query.get("model") or None,
        )
        return [job_json(job) for job in rows]

    def job(request: Request) -> dict[str, Any]:
        return job_detail(db, request.path_params["key"], interval_s=interval_s)

    def group(request: Request) -> dict[str, Any]:
        group_id = request.path_params["key"]
        members = store.list_jobs(db, group_id=group_id, limit=10_000)
        rows = compare_rows(db, group_id)
        return {
            "group": group_id,
            "metric": ranking(members[0].spec)[0] if members else None,
            "varied": varied_fields([spec_as_run(j) for j in members]),
            "compare": rows,
            "curves": {j.id: (j.metrics or {}).get("loss_curve") or live_curve(j.progress)
                       for j in members},
        }  # fmt: skip

    def models(request: Request) -> list[dict[str, Any]]:
        tags = store.model_tags(db)
        rows = store.list_models(
            db,
            name=request.query_params.get("name") or None,
            limit=int_param(request.query_params.get("limit"), PAGE_LIMIT),
        )
        return [model_json(m, tags.get((m.name, m.version), [])) for m in rows]

    def workers(request: Request) -> list[dict[str, Any]]:
        return [worker_json(live) for live in live_workers(db, interval_s=interval_s)]

    def report(request: Request) -> Response:
        html = build_report(db, request.path_params["key"])
        return HTMLResponse(html, headers={"content-security-policy": REPORT_POLICY})

    def metrics(request: Request) -> Response:
        return Response(metrics_text(registry), media_type=CONTENT_TYPE_LATEST)

    def cancel(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        from tuneq.worker.jobs.lifecycle import cancel as cancel_job

        return {"cancelled": cancel_job(db, request.path_params["key"])}

    def retry(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        from tuneq.worker.jobs.submit import retry as retry_job

        again = retry_job(settings, request.path_params["key"], resume=body.get("resume") is True)
        return {"queued": again.id}

    def tag(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        name = str(body.get("tag") or "").strip()
        if not name:
            raise BadRequest('give the tag, as {"tag": "champion"}')
        model = store.tag_model(db, ref=request.path_params["key"], tag=name)
        return {"tagged": f"{model.name}:{model.version}", "tag": name}

    def submit(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        from tuneq.worker.jobs.submit import submit_job

        try:
            spec = parse_spec(body)
        except (ValueError, TypeError) as exc:
            raise BadRequest(f"not a job file: {exc}") from None
        return {"queued": submit_job(settings, spec).id}

    routes = [
        *[Route(path, page(name, title)) for path, (name, title) in PAGES.items()],
        Route("/jobs/{key}", page("job", "Job")),
        Route("/groups/{key}", page("group", "Group")),
        Route("/jobs/{key}/report", read(report)),
        Route("/groups/{key}/report", read(report)),
        Route("/metrics", metrics),
        Route("/api/overview", read(overview)),
        Route("/api/queue", read(queue)),
        Route("/api/jobs", read(jobs)),
        Route("/api/jobs", action(submit, token, public), methods=["POST"]),
        Route("/api/jobs/{key}", read(job)),
        Route("/api/jobs/{key}/cancel", action(cancel, token, public), methods=["POST"]),
        Route("/api/jobs/{key}/retry", action(retry, token, public), methods=["POST"]),
        Route("/api/groups", read(lambda r: list_groups(db))),
        Route("/api/groups/{key}", read(group)),
        Route("/api/models", read(models)),
        Route("/api/models/{key}/tags", action(tag, token, public), methods=["POST"]),
        Route("/api/workers", read(workers)),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(SecurityHeaders)
    hosts = allowed_hosts(listen_host, settings.ui_hosts)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=["*"] if "*" in hosts else hosts)
    return app


class BadRequest(TuneqError):
    """A request the API cannot take as it is (400)."""


def live_curve(progress: dict[str, Any] | None) -> list[dict[str, float]]:
    """A running fine-tune's loss curve so far, as the finished job's metrics hold it."""
    points = (progress or {}).get("curve") or []
    return [{"step": step, "loss": loss} for step, loss in points]


def int_param(value: str | None, default: int) -> int:
    try:
        return max(1, min(10_000, int(value))) if value else default
    except ValueError:
        raise BadRequest(f"not a number: {value!r}") from None


def error_response(exc: Exception) -> JSONResponse:
    """A TuneqError as JSON with its HTTP status: 404 for what does not exist, 409 for a job
    in the wrong state, 400 for the rest."""
    if isinstance(exc, (JobNotFound, ModelNotFound)):
        status = 404
    elif isinstance(exc, JobStateError):
        status = 409
    else:
        status = 400
    return JSONResponse({"error": str(exc)}, status_code=status)


def read(build: Callable[[Request], Any]) -> Callable[[Request], Response]:
    """A GET endpoint answering ``build(request)``: as JSON unless it is a response."""

    def endpoint(request: Request) -> Response:
        try:
            answer = build(request)
            return answer if isinstance(answer, Response) else JSONResponse(answer)
        except TuneqError as exc:
            return error_response(exc)

    return endpoint


def action(
    run: Callable[[Request, dict[str, Any]], dict[str, Any]], token: str, public: tuple[str, ...]
) -> Callable[[Request], Any]:
    """A POST endpoint that checks origin and token before it reads the body or does
    anything; the body is JSON, or YAML for a job file."""

    async def endpoint(request: Request) -> Response:
        try:
            check_action(request, token, public)
        except Refused as refused:
            return JSONResponse({"error": refused.reason}, status_code=refused.status)
        try:
            body = parse_body(await request.body())
            return JSONResponse(await run_in_threadpool(run, request, body))
        except TuneqError as exc:
            return error_response(exc)

    return endpoint


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        data = yaml.safe_load(raw.decode("utf-8"))  # YAML reads JSON too
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not JSON or YAML: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest('the body must be a mapping, like {"kind": "finetune", ...}')
    return data


class SecurityHeaders:
    """Adds the page policy (no script but ours, no framing) to every answer that has none."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                if b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", PAGE_POLICY.encode()))
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"referrer-policy", b"same-origin"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
