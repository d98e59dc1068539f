"""The dashboard's pages at ``/ui``: server-rendered (Jinja2) over the same services the
API calls, behind the same API keys (a sign-in page sets a session cookie).

Pages refresh themselves with a little plain JavaScript (``static/ui.js``): a container
with ``data-poll`` fetches its fragment again every few seconds until the fragment says
it is final. Forms that change something (cancel, re-run, sign out) carry the session's
CSRF token.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from app.core.config import get_settings
from app.core.errors import AuthError, CorralError
from app.store import db, keys
from app.store.tables import ApiKey, WorkflowStatus
from app.ui import session, views
from app.ui.graph import layout
from app.workflows import service

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, ensure_ascii=False)


def _brief(output: dict[str, Any]) -> dict[str, Any]:
    """A step's output without its vectors (shown as a count)."""
    if "vectors" not in output:
        return output
    return {**output, "vectors": f"{len(output['vectors'])} vector(s)"}


templates.env.filters["brief"] = _brief
templates.env.filters["timestamp"] = lambda t: datetime.fromtimestamp(t, UTC).strftime(
    "%Y-%m-%d %H:%M:%S"
)

router = APIRouter(prefix="/ui", include_in_schema=False)


class Viewer:
    """The signed-in browser: its session and the API key it acts as."""

    def __init__(self, ui: session.UiSession, key: ApiKey) -> None:
        self.session, self.key = ui, key


def _key_row(key_id: int) -> ApiKey | None:
    with db.session_scope() as s:
        row = s.get(ApiKey, key_id)
        return row if row is not None and row.revoked_at is None else None


def _sign_in_first(request: Request) -> HTTPException:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return HTTPException(303, headers={"Location": f"/ui/login?next={quote(target)}"})


async def _viewer(request: Request) -> Viewer:
    ui = await run_in_threadpool(session.load, request.cookies.get(session.COOKIE))
    key = await run_in_threadpool(_key_row, ui.key_id) if ui is not None else None
    if ui is None or key is None:
        raise _sign_in_first(request)
    return Viewer(ui, key)


ViewerDep = Annotated[Viewer, Depends(_viewer)]


def _csrf(viewer: Viewer, sent: str | None) -> None:
    if not viewer.session.csrf_ok(sent):
        raise HTTPException(403, "the form's CSRF token is missing or wrong: reload the page")


def page(request: Request, template: str, viewer: Viewer | None, **context: Any) -> HTMLResponse:
    """Render ``template`` with the navigation and the viewer's CSRF token."""
    return templates.TemplateResponse(
        request,
        template,
        {"viewer": viewer, "csrf": viewer.session.csrf if viewer else "", **context},
    )


def _safe_next(target: str | None) -> str:
    return target if target and target.startswith("/ui") and "//" not in target else "/ui"


# ---- sign in and out ---------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str | None = None) -> HTMLResponse:
    return page(request, "login.html", None, next=_safe_next(next), error=None)


@router.post("/login", response_model=None)
def login(
    request: Request,
    key: Annotated[str, Form(max_length=200)],
    next: Annotated[str | None, Form()] = None,
) -> Response:
    """Check the API key; on success start a session and go where the viewer was going."""
    try:
        with db.session_scope() as s:
            row = keys.verify_key(s, key.strip())
    except AuthError:
        return templates.TemplateResponse(
            request,
            "login.html",
            {"viewer": None, "csrf": "", "next": _safe_next(next), "error": "Unknown key."},
            status_code=401,
        )
    assert row.id is not None
    ui = session.create(row.id)
    resp = RedirectResponse(_safe_next(next), status_code=303)
    settings = get_settings()
    resp.set_cookie(
        session.COOKIE,
        ui.token,
        max_age=settings.ui_session_ttl_s,
        path="/ui",
        secure=settings.ui_secure_cookie,
        httponly=True,
        samesite="strict",
    )
    return resp


@router.post("/logout")
def logout(viewer: ViewerDep, csrf: Annotated[str | None, Form()] = None) -> Response:
    _csrf(viewer, csrf)
    session.drop(viewer.session.token)
    resp = RedirectResponse("/ui/login", status_code=303)
    resp.delete_cookie(session.COOKIE, path="/ui")
    return resp


# ---- workflows -----------------------------------------------------------------------------


@router.get("", response_model=None)
def home(viewer: ViewerDep) -> Response:
    return RedirectResponse("/ui/workflows", status_code=303)


def _rows(viewer: Viewer, status: str | None, name: str | None) -> dict[str, Any]:
    chosen = WorkflowStatus(status) if status in set(WorkflowStatus) else None
    runs = service.page(viewer.key.id, status=chosen, limit=50, cursor=None, name=name or None)
    return {"runs": runs.items, "status": chosen, "name": name or ""}


@router.get("/workflows", response_class=HTMLResponse)
def workflows(
    request: Request,
    viewer: ViewerDep,
    status: str | None = None,
    name: Annotated[str | None, Query(max_length=200)] = None,
) -> HTMLResponse:
    """Workflows newest first, filtered by status and name; the rows refresh themselves."""
    return page(
        request,
        "workflows.html",
        viewer,
        statuses=[s.value for s in WorkflowStatus],
        **_rows(viewer, status, name),
    )


@router.get("/workflows/rows", response_class=HTMLResponse)
def workflow_rows(
    request: Request,
    viewer: ViewerDep,
    status: str | None = None,
    name: Annotated[str | None, Query(max_length=200)] = None,
) -> HTMLResponse:
    return page(request, "workflow_rows.html", viewer, **_rows(viewer, status, name))


def _run(viewer: Viewer, workflow_id: str) -> dict[str, Any]:
    run = service.read(workflow_id, viewer.key.id)
    spec = service.spec(workflow_id, viewer.key.id)
    inputs = {s["id"]: s.get("input") for s in spec.get("steps", [])}
    return {"run": run, "graph": layout(run.steps), "inputs": inputs}


@router.get("/workflows/{workflow_id}", response_class=HTMLResponse)
def run_page(
    request: Request, viewer: ViewerDep, workflow_id: str, notice: str | None = None
) -> HTMLResponse:
    """A run: its steps as a graph, each step's state, input, output or error."""
    return page(request, "run.html", viewer, notice=notice, **_run(viewer, workflow_id))


@router.get("/workflows/{workflow_id}/live", response_class=HTMLResponse)
def run_live(request: Request, viewer: ViewerDep, workflow_id: str) -> HTMLResponse:
    return page(request, "run_live.html", viewer, **_run(viewer, workflow_id))


@router.post("/workflows/{workflow_id}/cancel")
def cancel(
    viewer: ViewerDep, workflow_id: str, csrf: Annotated[str | None, Form()] = None
) -> Response:
    _csrf(viewer, csrf)
    service.cancel(workflow_id, viewer.key.id)
    return RedirectResponse(f"/ui/workflows/{workflow_id}", status_code=303)


@router.post("/workflows/{workflow_id}/rerun")
def rerun(
    viewer: ViewerDep, workflow_id: str, csrf: Annotated[str | None, Form()] = None
) -> Response:
    """Submit the run's spec again as a new workflow and show it."""
    _csrf(viewer, csrf)
    spec = service.spec(workflow_id, viewer.key.id)
    settings = get_settings()
    try:
        new = service.submit(
            spec, catalog=views.catalog(), settings=settings, api_key_id=viewer.key.id
        )
    except CorralError as exc:
        notice = quote(f"re-run refused: {exc}")
        return RedirectResponse(f"/ui/workflows/{workflow_id}?notice={notice}", status_code=303)
    return RedirectResponse(f"/ui/workflows/{new.id}", status_code=303)


# ---- the platform --------------------------------------------------------------------------


@router.get("/gpus", response_class=HTMLResponse)
def gpus(request: Request, viewer: ViewerDep) -> HTMLResponse:
    """Each GPU's memory as bars, the pools, and the placements waiting for room."""
    return page(request, "gpus.html", viewer, **views.gpus())


@router.get("/models", response_class=HTMLResponse)
def models(request: Request, viewer: ViewerDep) -> HTMLResponse:
    """The catalog: which files are present, live pools, per-model figures."""
    return page(request, "models.html", viewer, **views.models())


@router.get("/alerts", response_class=HTMLResponse)
def alerts(request: Request, viewer: ViewerDep) -> HTMLResponse:
    """Open and recent alerts, and the rules."""
    return page(request, "alerts.html", viewer, **views.alerts())


@router.get("/conversations", response_class=HTMLResponse)
def conversations(request: Request, viewer: ViewerDep) -> HTMLResponse:
    """This key's conversations, most recently active first (read-only)."""
    return page(request, "conversations.html", viewer, **views.conversations(viewer.key.id))


@router.get("/conversations/{conversation_id}", response_class=HTMLResponse)
def conversation(request: Request, viewer: ViewerDep, conversation_id: str) -> HTMLResponse:
    """A conversation's messages and its user's memory blocks (read-only)."""
    return page(
        request,
        "conversation.html",
        viewer,
        **views.conversation(viewer.key.id, conversation_id),
    )
