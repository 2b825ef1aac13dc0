"""The FastAPI application behind ``modelfactory serve`` (one app, one router per concern)."""

from __future__ import annotations

from fastapi import FastAPI

from modelfactory.interfaces.server import api, hooks, pages


def create_app() -> FastAPI:
    """A fresh app; routers read settings (catalog URL, webhook secret...) when they handle requests."""
    app = FastAPI(title="modelfactory", summary="Webhooks, catalog API and pages of the model factory.",
                  version="0.1.0")
    app.include_router(hooks.router)
    app.include_router(api.router)
    app.include_router(pages.router)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
