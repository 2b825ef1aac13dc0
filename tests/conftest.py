"""Shared fixtures: an isolated factory home, SmolLM2's tokenizer, a tiny random Llama, one Prefect API,
a moto S3 server and a local Hub. The helpers behind them live in :mod:`modelfactory.testing` (shared with
``bench/``); import helpers from there, fixtures come from here."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from modelfactory.catalog import Catalog, open_catalog
from modelfactory.testing.catalog import PostgresUnavailable, postgres_schema_url
from modelfactory.testing.env import REPO, SHARED_DATA, settings_env
from modelfactory.testing.hub_server import LocalHub, hub_client_env
from modelfactory.testing.models import (
    make_lora,
    make_tiny_llama,
    save_smollm2_tokenizer,
)
from modelfactory.testing.runs import SharedRun, passing_spec, run_in_catalog
from modelfactory.testing.s3_server import MotoS3, s3_environment

__all__ = ["REPO"]


#: Modules that take minutes on 2 cores, longest first (per-module sums of a ``make test`` run's
#: ``--junitxml``, 2026-11-29). ``make test`` hands whole modules to two xdist workers in collection
#: order: starting these first lets both workers finish together instead of one running the
#: end-to-end test alone at the end.
SLOWEST_FIRST = ("test_smollm2_e2e.py", "test_chaos.py", "test_gpu_pool.py", "test_load.py", "test_sweep_pool.py",
                 "test_triggers.py", "test_sweep_flow.py", "test_stage_handoff.py", "test_verdict.py",
                 "test_quantize.py", "test_s3.py", "test_runnability.py")


#: The modules that build on the session's ``tiny_run``: ``make test`` hands them to one xdist worker as one
#: unit (:func:`pytest_xdist_make_scheduler`), so that run is made once per suite, not once per worker.
TINY_RUN_MODULES = frozenset({"test_quantize.py", "test_flow.py", "test_record.py", "test_cli.py"})


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with the :data:`TINY_RUN_MODULES` as one work unit (xdist's own file scheduler; only
    the unit a test belongs to changes)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class TinyRunTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return "tiny_run modules" if Path(path).name in TINY_RUN_MODULES else path

    return TinyRunTogether(config, log)


#: Fixtures of tests that run Prefect flows (the factory, a sweep) on the tiny model: they get the
#: ``flow`` marker, which ``make test-fast`` deselects (each flow quantizes and benchmarks in child
#: processes: a minute or more of CPU on 2 cores).
FLOW_FIXTURES = frozenset({"prefect", "tiny_run"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise
    for item in items:
        if FLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.flow)


@pytest.fixture(scope="session", autouse=True)
def factory_home(tmp_path_factory) -> Path:
    """Every test session writes its work dir and store under one temp folder."""
    home = tmp_path_factory.mktemp("mfhome")
    assert (SHARED_DATA / "wikitext-2-raw-v1" / "test.txt").is_file(), f"WikiText-2 not found under {SHARED_DATA}"
    os.environ.update({
        "MODELFACTORY_HOME": str(home),
        "MODELFACTORY_DATA_DIR": str(SHARED_DATA),
        "MODELFACTORY_CACHE_DIR": os.environ.get("MODELFACTORY_CACHE_DIR", str(REPO / ".mf" / "cache")),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no internet: the telemetry service only logs errors
    })
    os.environ.pop("MODELFACTORY_CATALOG_URL", None)
    from modelfactory.core.settings import get_settings

    get_settings.cache_clear()
    return home


@pytest.fixture(scope="module", autouse=True)
def module_catalog(factory_home, tmp_path_factory, request) -> Iterator[str]:
    """Each test module gets its own SQLite catalog (no module sees another's runs); a module that
    sets MODELFACTORY_CATALOG_URL itself (PostgreSQL, its own servers) overrides it."""
    name = request.module.__name__.rsplit(".", 1)[-1]
    url = f"sqlite:///{tmp_path_factory.mktemp(f'catalog-{name}') / 'catalog.db'}"
    with settings_env(MODELFACTORY_CATALOG_URL=url):
        yield url


@pytest.fixture
def set_env():
    """``set_env(NAME=value, OTHER=None)``: environment variables (``None``: unset) with the factory's
    settings cache cleared, for the rest of the test; restored (cache cleared again) afterwards."""
    with ExitStack() as stack:
        yield lambda **values: stack.enter_context(settings_env(**values))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty catalog database: a SQLite file (in a folder not yet created) or a fresh PostgreSQL
    schema (``postgres`` marker: fails, not skips, when the server is down)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'home' / 'catalog.db'}"
        return
    with ExitStack() as stack:
        try:
            url = stack.enter_context(postgres_schema_url())
        except PostgresUnavailable as exc:
            pytest.fail(str(exc), pytrace=False)
        yield url


@pytest.fixture
def catalog(catalog_url: str) -> Iterator[Catalog]:
    """An opened (upgraded) empty catalog on each backend of ``catalog_url``."""
    cat = open_catalog(catalog_url)
    yield cat
    cat.dispose()


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer, extracted from the GGUF (EOS fixed as the download step does)."""
    return save_smollm2_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_lora(tiny_llama, tmp_path_factory) -> Path:
    """A random LoRA adapter for the tiny Llama (non-zero B: merging changes the logits)."""
    return make_lora(tiny_llama, tmp_path_factory.mktemp("tiny-lora"))


@pytest.fixture(scope="session")
def tiny_run(prefect, tiny_llama, tiny_lora, tmp_path_factory) -> SharedRun:
    """One passing factory run of the tiny model + LoRA (real peft, GPTQModel, benchmark, gate, store),
    made once per session and recorded in a catalog of its own. Its step outputs stay in the session's
    work dir: modules that run the same spec (a rerun, the CLI) reuse them instead of quantizing again."""
    url = f"sqlite:///{tmp_path_factory.mktemp('catalog-tiny-run') / 'catalog.db'}"
    return run_in_catalog(passing_spec(tiny_llama, tiny_lora), catalog_url=url)


@pytest.fixture(scope="session")
def prefect(factory_home):
    """One ephemeral Prefect API for the whole session (starting one takes ~8 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# --------------------------------------------------------------------------- S3 (moto server)
@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    server = MotoS3()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def s3_env(moto_s3) -> Iterator[MotoS3]:
    with s3_environment(moto_s3.url):
        yield moto_s3


@pytest.fixture()
def s3_bucket(s3_env) -> str:
    name = f"mf-{uuid.uuid4().hex[:10]}"
    s3_env.client().create_bucket(Bucket=name)
    return name


# --------------------------------------------------------------------------- a local Hub
@pytest.fixture(scope="module")
def local_hub(tmp_path_factory) -> Iterator[LocalHub]:
    """A running local Hub for this test module, with the huggingface_hub client pointed at it."""
    server = LocalHub(tmp_path_factory.mktemp("hub-storage")).start()
    try:
        with hub_client_env(server.endpoint, tmp_path_factory.mktemp("hf-cache")):
            yield server
    finally:
        server.stop()
