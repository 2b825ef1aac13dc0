"""``modelfactory serve``'s app pointed at a given catalog: in-process (``TestClient``) or under a
real uvicorn on a free loopback port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from modelfactory.core.errors import CatalogError
from modelfactory.interfaces.server import api as api_module
from modelfactory.interfaces.server import create_app
from modelfactory.testing.env import free_port, settings_env


def _dispose_cached_catalog() -> None:
    try:
        api_module.get_catalog().dispose()
    except CatalogError:  # never opened (a catalog behind head, an unreachable one)
        pass


@contextmanager
def catalog_app_env(url: str) -> Iterator[None]:
    """Point the app (settings + its per-URL catalog cache) at the catalog *url*."""
    with settings_env(MODELFACTORY_CATALOG_URL=url):
        api_module._catalog.cache_clear()
        try:
            yield
        finally:
            _dispose_cached_catalog()
            api_module._catalog.cache_clear()


@contextmanager
def serve_catalog(url: str) -> Iterator[str]:
    """The app on the catalog *url* under uvicorn in a thread on a free loopback port; its base URL."""
    import uvicorn

    port = free_port()
    with catalog_app_env(url):
        server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True, name="catalog-app")
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(timeout=10)
