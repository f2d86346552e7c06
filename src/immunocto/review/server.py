"""The review server (FastAPI): the page, its JSON API and the crop images.

(No ``from __future__ import annotations`` here: FastAPI resolves the dependency annotations
at runtime, and they are local to :func:`create_app`.)

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
- ``GET /api/agreement`` (JSON), ``GET /api/agreement.png`` (confusion matrices).
"""

import logging
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from immunocto.db.store import read_index
from immunocto.review.agreement import agreement_report, save_confusion_figure
from immunocto.review.batches import STRATEGIES, candidates, next_batch
from immunocto.review.images import Renderer
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


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def create_app(
    run: str | os.PathLike[str],
    *,
    blind: bool = False,
    strategy: str = "random",
    batch_size: int = 24,
    seed: int = 0,
) -> FastAPI:
    """The review app over ``run`` (its crop store, cell tables and ``review.sqlite``)."""
    run = Path(run)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}")
    store = ReviewStore(review_path(run))
    cands = candidates(run)
    by_row = cands.set_index("row")
    renderer = Renderer(run)
    app = FastAPI(title="immunocto review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = (
            "no-store"
            if request.url.path.startswith("/api/") and not request.url.path.endswith(".png")
            else "private, max-age=3600"
        )
        return response

    def reviewer_header(request: Request) -> str:
        name = store.reviewer_for(_bearer(request))
        if name is None:
            raise HTTPException(
                401, "missing or wrong token", headers={"WWW-Authenticate": "Bearer"}
            )
        return name

    def reviewer_any(request: Request) -> str:
        name = store.reviewer_for(_bearer(request) or request.cookies.get(COOKIE))
        if name is None:
            raise HTTPException(
                401, "missing or wrong token", headers={"WWW-Authenticate": "Bearer"}
            )
        return name

    ByHeader = Annotated[str, Depends(reviewer_header)]
    ByAny = Annotated[str, Depends(reviewer_any)]

    def known_row(row: int) -> int:
        if row not in by_row.index:
            raise HTTPException(404, f"no crop {row}")
        return row

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/agreement", include_in_schema=False)
    def agreement_page() -> FileResponse:
        return FileResponse(STATIC / "agreement.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.post("/api/login")
    def login(body: Login, response: Response) -> dict[str, str]:
        name = store.reviewer_for(body.token)
        if name is None:
            raise HTTPException(401, "unknown token")
        response.set_cookie(COOKIE, body.token, httponly=True, samesite="strict", path="/api/")
        return {"reviewer": name}

    @app.get("/api/me")
    def me(reviewer: ByAny) -> dict[str, Any]:
        done = len(store.reviewed_rows(reviewer))
        return {
            "reviewer": reviewer, "blind": blind, "strategy": strategy, "strategies": list(STRATEGIES),
            "labels": list(DECISION_LABELS), "markers": renderer.markers, "done": done, "total": len(cands),
            "context": (run / "immunocto.yaml").exists(),
        }  # fmt: skip

    @app.get("/api/batch")
    def batch(
        reviewer: ByAny,
        strategy_: Annotated[str | None, Query(alias="strategy")] = None,
        size: Annotated[int, Query(ge=1, le=200)] = batch_size,
    ) -> dict[str, Any]:
        chosen = strategy_ or strategy
        if chosen not in STRATEGIES:
            raise HTTPException(422, f"strategy must be one of {', '.join(STRATEGIES)}")
        latest = store.latest()
        items = next_batch(cands, latest, reviewer, strategy=chosen, size=size, seed=seed)
        out = []
        for r in items.itertuples(index=False):
            item: dict[str, Any] = {
                "row": int(r.row),
                "slide_id": str(r.slide_id),
                "cell_id": int(r.cell_id),
            }
            if not blind:
                item["proposed"] = str(r.label)
                item["margin"] = (
                    None if not np.isfinite(r.gate_margin) else round(float(r.gate_margin), 3)
                )
            out.append(item)
        done = int((latest["reviewer"] == reviewer).sum())
        return {"strategy": chosen, "items": out, "done": done, "total": len(cands)}

    @app.post("/api/decisions")
    def decide(body: Decision | Decisions, reviewer: ByHeader) -> dict[str, int]:
        items = body.decisions if isinstance(body, Decisions) else [body]
        rows = []
        for d in items:
            if d.row not in by_row.index:
                raise HTTPException(422, f"no crop {d.row} in this database")
            cell = by_row.loc[d.row]
            rows.append(
                {
                    "slide_id": str(cell["slide_id"]),
                    "cell_id": int(cell["cell_id"]),
                    "row": d.row,
                    "label": d.label,
                    "unsure": d.unsure or d.label == "ambiguous",
                }
            )
        stored = store.add_decisions(reviewer, rows)
        log.info("%s: %d decision(s)", reviewer, stored)
        return {"stored": stored}

    @app.post("/api/undo")
    def undo(body: Undo, reviewer: ByHeader) -> dict[str, Any]:
        known_row(body.row)
        return {"row": body.row, "label": store.undo(reviewer, body.row)}

    @app.get("/api/crops/{row}/he.png")
    def he_png(row: int, _: ByAny, contour: bool = True) -> Response:
        return Response(renderer.he(known_row(row), contour=contour), media_type="image/png")

    @app.get("/api/crops/{row}/if.png")
    def if_png(row: int, _: ByAny, channels: str = "") -> Response:
        if not renderer.markers:
            raise HTTPException(404, "this database has no IF crops")
        names = [c for c in channels.split(",") if c] or renderer.markers
        bad = [c for c in names if c not in renderer.markers]
        if bad:
            raise HTTPException(422, f"unknown channel(s); known: {', '.join(renderer.markers)}")
        return Response(renderer.if_composite(known_row(row), names), media_type="image/png")

    @app.get("/api/crops/{row}/context.png")
    def context_png(row: int, _: ByAny) -> Response:
        data = renderer.context(known_row(row))
        if data is None:
            raise HTTPException(404, "no slide context for this database")
        return Response(data, media_type="image/png")

    def report() -> dict[str, Any]:
        index = read_index(run)[0].to_pandas()
        return agreement_report(store.latest(), index, n_boot=1000)

    @app.get("/api/agreement")
    def agreement(_: ByAny) -> JSONResponse:
        rep = report()
        return JSONResponse(_finite(rep))

    @app.get("/api/agreement.png")
    def agreement_png(_: ByAny) -> Response:
        with tempfile.TemporaryDirectory() as tmp:
            path = save_confusion_figure(report(), Path(tmp) / "agreement.png")
            return Response(path.read_bytes(), media_type="image/png")

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
