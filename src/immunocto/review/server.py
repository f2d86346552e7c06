"""The review server (FastAPI): the page, its JSON API and the crop images.

(No ``from __future__ import annotations`` here: FastAPI resolves the dependency annotations
at runtime.) The routes come in groups (``pages``, ``session``, ``decisions``, ``images``,
``agreement``, ``admin``: one :class:`fastapi.APIRouter` each); :func:`create_app` joins them over one
:class:`Review`, the run's state, kept in ``app.state.review``.

Routes (all API routes need a reviewer token: ``Authorization: Bearer <token>``; the page's
images may use the ``immunocto_token`` cookie that ``POST /api/login`` sets instead, since
``<img>`` cannot send headers; ``POST`` routes accept the header only):

- ``GET /`` the review page, ``GET /agreement`` the agreement page (static files);
- ``POST /api/login`` ``{token}`` -> ``{reviewer}`` (+ cookie);
- ``GET /api/me`` reviewer, blind mode, strategies, IF markers, progress;
- ``GET /api/batch?strategy=&size=`` the next cells (proposed labels left out in blind mode);
- ``POST /api/decisions`` ``{row, label, unsure}`` or ``{decisions: [...]}``: 401 without a
  valid token, 422 for a label outside :data:`DECISION_LABELS` or an unknown row;
- ``POST /api/undo`` ``{row}``;
- ``GET /api/crops/{row}/he.png``, ``/if.png?channels=A,B``, ``/context.png`` (integer rows only);
- ``GET /api/agreement`` (JSON), ``GET /api/agreement.png`` (confusion matrices);
- admin tokens only (403 for a reviewer's): ``GET /api/admin/reviewers``, ``POST
  /api/admin/reviewers`` ``{name, role}`` (the new token, once), ``POST /api/admin/revoke``
  ``{name}``, ``POST /api/admin/export`` (V0). Bodies over 1 MB get 413; a client over its
  request rate, or an address after 10 wrong tokens, gets 429 (:mod:`.limits`).
"""

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from immunocto.db.store import read_index
from immunocto.errors import ImmunoctoError
from immunocto.review.agreement import agreement_report, save_confusion_figure
from immunocto.review.batches import STRATEGIES, candidates, next_batch
from immunocto.review.images import Renderer
from immunocto.review.limits import Limits
from immunocto.review.store import DECISION_LABELS, ReviewStore, review_path

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
COOKIE = "immunocto_token"

Label = Literal["cd4_t", "cd8_t", "b_cell", "macrophage", "other", "not_cell", "ambiguous"]
assert set(Label.__args__) == set(DECISION_LABELS)  # type: ignore[attr-defined]


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid")
    row: int = Field(ge=0)
    label: Label
    unsure: bool = False


class Decisions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    decisions: list[Decision] = Field(min_length=1, max_length=1000)


class Login(BaseModel):
    token: str = Field(min_length=1, max_length=200)


class Undo(BaseModel):
    row: int = Field(ge=0)


class NewReviewer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    role: Literal["reviewer", "admin"] = "reviewer"


class Revoke(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)


#: Largest request body accepted (bytes); a batch of 1,000 decisions is ~80 kB.
MAX_BODY = 1 << 20


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


@dataclass
class Review:
    """What the routes share: the run, its decisions store, the cells to review (``cands``,
    indexed by crop row in ``by_row``), the crop renderer, and the session's settings."""

    run: Path
    store: ReviewStore
    cands: pd.DataFrame
    by_row: pd.DataFrame
    renderer: Renderer
    blind: bool
    strategy: str
    batch_size: int
    seed: int
    _orders: dict[tuple[str, str], np.ndarray] = field(default_factory=dict, repr=False)

    def order(self, reviewer: str, strategy: str) -> np.ndarray:
        """The crop rows in the order ``strategy`` shows them to ``reviewer`` (everything
        undecided; fixed per reviewer and seed), computed once: a batch is then the first
        rows of it the reviewer has not decided (no shuffle of every candidate per request)."""
        key = (reviewer, strategy)
        if key not in self._orders:
            nobody = pd.DataFrame({"reviewer": pd.Series([], dtype=object), "row": []})
            ranked = next_batch(self.cands, nobody, reviewer, strategy=strategy,
                                size=len(self.cands), seed=self.seed)  # fmt: skip
            self._orders[key] = ranked["row"].to_numpy(np.int64)
        return self._orders[key]

    def known_row(self, row: int) -> int:
        if row not in self.by_row.index:
            raise HTTPException(404, f"no crop {row}")
        return row


def _review(request: Request) -> Review:
    return request.app.state.review


def _address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _signed_in(request: Request, token: str | None) -> tuple[str, str]:
    """``(name, role)`` of ``token``: 401 when it is wrong (counted against the address),
    429 once the address has failed too often (not even a right token is checked then)."""
    failures = request.app.state.limits.failures
    where = _address(request)
    if failures.empty(where):
        raise HTTPException(
            429, "too many failed sign-ins from this address; wait and try again",
            headers={"Retry-After": str(failures.wait(where))},
        )  # fmt: skip
    who = _review(request).store.identify(token)
    if who is None:
        if token:  # a wrong token, not a page that has not signed in yet
            failures.take(where)
        raise HTTPException(401, "missing or wrong token", headers={"WWW-Authenticate": "Bearer"})
    return who


def _reviewer(request: Request, token: str | None) -> str:
    return _signed_in(request, token)[0]


def reviewer_header(request: Request) -> str:
    """The reviewer of the ``Authorization: Bearer`` token (POST routes)."""
    return _reviewer(request, _bearer(request))


def admin_header(request: Request) -> str:
    """The admin of the bearer token: 401 without a valid token, 403 for a reviewer's."""
    who = _signed_in(request, _bearer(request))
    if who[1] != "admin":
        raise HTTPException(403, "this needs an admin token")
    return who[0]


def reviewer_any(request: Request) -> str:
    """The reviewer of the bearer token or, for ``<img>`` requests, the login cookie."""
    return _reviewer(request, _bearer(request) or request.cookies.get(COOKIE))


Ctx = Annotated[Review, Depends(_review)]
ByHeader = Annotated[str, Depends(reviewer_header)]
ByAny = Annotated[str, Depends(reviewer_any)]
ByAdmin = Annotated[str, Depends(admin_header)]

# ---- the page and its static files --------------------------------------------------------
pages = APIRouter(include_in_schema=False)


@pages.get("/")
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@pages.get("/favicon.ico")
def favicon() -> Response:
    return Response(status_code=204)


@pages.get("/agreement")
def agreement_page() -> FileResponse:
    return FileResponse(STATIC / "agreement.html")


# ---- sign-in and the reviewer's session ---------------------------------------------------
session = APIRouter(prefix="/api")


@session.post("/login")
def login(body: Login, request: Request, response: Response) -> dict[str, str]:
    name = _reviewer(request, body.token)  # wrong tokens count against the address here too
    response.set_cookie(COOKIE, body.token, httponly=True, samesite="strict", path="/api/")
    return {"reviewer": name}


@session.get("/me")
def me(reviewer: ByAny, ctx: Ctx) -> dict[str, Any]:
    done = len(ctx.store.reviewed_rows(reviewer))
    return {
        "reviewer": reviewer, "blind": ctx.blind, "strategy": ctx.strategy,
        "strategies": list(STRATEGIES), "labels": list(DECISION_LABELS),
        "markers": ctx.renderer.markers, "done": done, "total": len(ctx.cands),
        "context": (ctx.run / "immunocto.yaml").exists(),
    }  # fmt: skip


# ---- batches and decisions ----------------------------------------------------------------
decisions = APIRouter(prefix="/api")


@decisions.get("/batch")
def batch(
    reviewer: ByAny,
    ctx: Ctx,
    strategy: Annotated[str | None, Query()] = None,
    size: Annotated[int | None, Query(ge=1, le=200)] = None,
) -> dict[str, Any]:
    chosen = strategy or ctx.strategy
    if chosen not in STRATEGIES:
        raise HTTPException(422, f"strategy must be one of {', '.join(STRATEGIES)}")
    # only "disagreements" compares with the other reviewers; the rest need this one's rows
    latest = ctx.store.latest(None if chosen == "disagreements" else reviewer)
    size = size or ctx.batch_size
    if chosen == "disagreements":  # depends on everyone's decisions: ranked afresh
        items = next_batch(ctx.cands, latest, reviewer, strategy=chosen, size=size, seed=ctx.seed)
    else:
        order = ctx.order(reviewer, chosen)
        mine = latest["row"].to_numpy(np.int64)
        rows = order[~np.isin(order, mine)][:size]
        items = ctx.by_row.loc[rows].reset_index()
    out = []
    for r in items.itertuples(index=False):
        item: dict[str, Any] = {"row": int(r.row), "slide_id": str(r.slide_id),
                                "cell_id": int(r.cell_id)}  # fmt: skip
        if not ctx.blind:
            item["proposed"] = str(r.label)
            item["margin"] = (
                None if not np.isfinite(r.gate_margin) else round(float(r.gate_margin), 3)
            )
        out.append(item)
    done = int((latest["reviewer"] == reviewer).sum())
    return {"strategy": chosen, "items": out, "done": done, "total": len(ctx.cands)}


@decisions.post("/decisions")
def decide(body: Decision | Decisions, reviewer: ByHeader, ctx: Ctx) -> dict[str, int]:
    items = body.decisions if isinstance(body, Decisions) else [body]
    rows = []
    for d in items:
        if d.row not in ctx.by_row.index:
            raise HTTPException(422, f"no crop {d.row} in this database")
        cell = ctx.by_row.loc[d.row]
        rows.append({
            "slide_id": str(cell["slide_id"]), "cell_id": int(cell["cell_id"]), "row": d.row,
            "label": d.label, "unsure": d.unsure or d.label == "ambiguous",
        })  # fmt: skip
    stored = ctx.store.add_decisions(reviewer, rows)
    log.info("%s: %d decision(s)", reviewer, stored)
    return {"stored": stored}


@decisions.post("/undo")
def undo(body: Undo, reviewer: ByHeader, ctx: Ctx) -> dict[str, Any]:
    ctx.known_row(body.row)
    return {"row": body.row, "label": ctx.store.undo(reviewer, body.row)}


# ---- crop images --------------------------------------------------------------------------
images = APIRouter(prefix="/api/crops")


@images.get("/{row}/he.png")
def he_png(row: int, _: ByAny, ctx: Ctx, contour: bool = True) -> Response:
    return Response(ctx.renderer.he(ctx.known_row(row), contour=contour), media_type="image/png")


@images.get("/{row}/if.png")
def if_png(row: int, _: ByAny, ctx: Ctx, channels: str = "") -> Response:
    markers = ctx.renderer.markers
    if not markers:
        raise HTTPException(404, "this database has no IF crops")
    names = [c for c in channels.split(",") if c] or markers
    if any(c not in markers for c in names):
        raise HTTPException(422, f"unknown channel(s); known: {', '.join(markers)}")
    return Response(ctx.renderer.if_composite(ctx.known_row(row), names), media_type="image/png")


@images.get("/{row}/context.png")
def context_png(row: int, _: ByAny, ctx: Ctx) -> Response:
    data = ctx.renderer.context(ctx.known_row(row))
    if data is None:
        raise HTTPException(404, "no slide context for this database")
    return Response(data, media_type="image/png")


# ---- agreement ----------------------------------------------------------------------------
agreement = APIRouter(prefix="/api")


def _report(ctx: Review) -> dict[str, Any]:
    index = read_index(ctx.run)[0].to_pandas()
    return agreement_report(ctx.store.latest(), index, n_boot=1000)


@agreement.get("/agreement")
def agreement_json(_: ByAny, ctx: Ctx) -> JSONResponse:
    return JSONResponse(_finite(_report(ctx)))


@agreement.get("/agreement.png")
def agreement_png(_: ByAny, ctx: Ctx) -> Response:
    with tempfile.TemporaryDirectory() as tmp:
        path = save_confusion_figure(_report(ctx), Path(tmp) / "agreement.png")
        return Response(path.read_bytes(), media_type="image/png")


# ---- administration: tokens and the V0 export (admin tokens only) -------------------------
admin = APIRouter(prefix="/api/admin")


@admin.get("/reviewers")
def roster(_: ByAdmin, ctx: Ctx) -> dict[str, Any]:
    return {"reviewers": ctx.store.roster()}


@admin.post("/reviewers")
def mint(body: NewReviewer, by: ByAdmin, ctx: Ctx) -> dict[str, str]:
    """A new reviewer (or admin) and its token, shown in this answer only."""
    try:
        token = ctx.store.add_reviewer(body.name, body.role)
    except ImmunoctoError as err:
        raise HTTPException(409, str(err)) from None
    log.info("%s added %s %s", by, body.role, body.name)
    return {"name": body.name, "role": body.role, "token": token}


@admin.post("/revoke")
def revoke(body: Revoke, by: ByAdmin, ctx: Ctx) -> dict[str, str]:
    try:
        ctx.store.revoke(body.name)
    except ImmunoctoError as err:
        raise HTTPException(404, str(err)) from None
    log.info("%s revoked %s", by, body.name)
    return {"revoked": body.name}


@admin.post("/export")
def export_v0(_: ByAdmin, ctx: Ctx) -> dict[str, Any]:
    """Write the reviewers' consensus as ``review_label`` into the cell tables (V0)."""
    from immunocto.review.export import export_reviews

    return {"slides": export_reviews(ctx.run)}


class Guard:
    """One plain ASGI middleware in front of every route (Starlette's ``@app.middleware``
    layers cost ~0.5 ms each per request, the review server's main cost under load):

    - 413 for a body over :data:`MAX_BODY` (by its declared length) before it is read;
    - 429 (with ``Retry-After``) for a client over its request rate (:mod:`.limits`); the
      client is its token, its login cookie, or else its address;
    - on every answer: CSP, no sniffing, no referrer; API answers are not cached, images for an
      hour.
    """

    CSP = b"default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'"
    NAMES = frozenset({b"content-security-policy", b"x-content-type-options", b"referrer-policy",
             b"cache-control"})  # fmt: skip

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        path = request.url.path
        api = path.startswith("/api/") and not path.endswith(".png")
        extra = [(b"content-security-policy", self.CSP), (b"x-content-type-options", b"nosniff"),
                 (b"referrer-policy", b"no-referrer"),
                 (b"cache-control", b"no-store" if api else b"private, max-age=3600")]  # fmt: skip

        async def send_guarded(message: dict) -> None:
            if message["type"] == "http.response.start":
                kept = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() not in self.NAMES
                ]
                message = {**message, "headers": kept + extra}
            await send(message)

        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            refusal = JSONResponse({"detail": f"request body over {MAX_BODY} bytes"}, 413)
            await refusal(scope, receive, send_guarded)
            return
        key = _bearer(request) or request.cookies.get(COOKIE) or "addr:" + _address(request)
        bucket = request.app.state.limits.requests
        if not bucket.take(key):
            refusal = JSONResponse({"detail": "too many requests; slow down"}, 429,
                                   headers={"Retry-After": str(bucket.wait(key))})  # fmt: skip
            await refusal(scope, receive, send_guarded)
            return
        await self.app(scope, receive, send_guarded)


def create_app(
    run: str | os.PathLike[str],
    *,
    blind: bool = False,
    strategy: str = "random",
    batch_size: int = 24,
    seed: int = 0,
    limits: Limits | None = None,
) -> FastAPI:
    """The review app over ``run`` (its crop store, cell tables and ``review.sqlite``):
    the route groups above over one :class:`Review` in ``app.state.review``; ``limits``: the
    request and failed-sign-in rates (:class:`~immunocto.review.limits.Limits` defaults)."""
    run = Path(run)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}")
    cands = candidates(run)
    review = Review(
        run=run, store=ReviewStore(review_path(run)), cands=cands, by_row=cands.set_index("row"),
        renderer=Renderer(run), blind=blind, strategy=strategy, batch_size=batch_size, seed=seed,
    )  # fmt: skip
    app = FastAPI(title="immunocto review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.review = review
    app.state.store = review.store
    app.state.limits = limits or Limits()
    app.add_middleware(Guard)
    for router in (pages, session, decisions, images, agreement, admin):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _finite(obj: Any) -> Any:
    """JSON has no NaN: replace it with None, recursively."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
