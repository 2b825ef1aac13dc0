"""Test and benchmark support: real servers on loopback, tiny models, settings overrides.

Shared by ``tests/`` and ``bench/`` (which never import each other), like ``prefect.testing``:

- :mod:`~modelfactory.testing.env`            ``settings_env`` (environment + settings cache), ``free_port``, paths
- :mod:`~modelfactory.testing.models`         the SmolLM2 GGUF, a tiny random Llama, LoRA adapters, cheap specs
- :mod:`~modelfactory.testing.runs`           one shared passing factory run of the tiny model
- :mod:`~modelfactory.testing.catalog`        PostgreSQL schemas, old revisions, bare runs, the seeded catalog
- :mod:`~modelfactory.testing.server`         ``modelfactory serve``'s app on a given catalog (in-process or uvicorn)
- :mod:`~modelfactory.testing.disks`          a real tiny tmpfs, to fill a disk
- :mod:`~modelfactory.testing.prefect_server` a real ``prefect server`` and GPU-host workers (background processes)
- :mod:`~modelfactory.testing.pool`           runs sent to a real GPU pool: settings, specs, threads, diagnostics
- :mod:`~modelfactory.testing.s3_server`      a real S3 API (moto server mode)
- :mod:`~modelfactory.testing.hub_server`     a local Hugging Face Hub-compatible server
- :mod:`~modelfactory.testing.browser`        headless Chromium through Playwright

Nothing here runs in production code paths; the import-linter contract keeps it on top.
"""
