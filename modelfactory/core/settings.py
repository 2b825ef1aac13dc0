"""Process-wide settings, read from ``MODELFACTORY_*`` environment variables.

Everything the factory writes lives under ``home`` unless a setting points elsewhere:

- ``home``            ``~/.modelfactory``
- ``catalog_url``     ``sqlite:///<home>/catalog.db``
- ``store_url``       ``file://<home>/store`` (published artifacts)
- ``work_dir``        ``<home>/work`` (step outputs, keyed by input hash)
- ``cache_dir``       ``<home>/cache``: the GPU steps' compile caches (GPTQModel/Marlin JIT, Inductor,
  Triton, torch extensions, CUDA PTX; ``modelfactory.core.caches``), reused by every run on a
  host; keep it on a persistent volume. The HF model cache is HF's own (``HF_HOME``).
- ``data_dir``        optional folder holding local copies of datasets, e.g. ``../shared/data``:
  a dataset name such as ``wikitext-2-raw-v1/test`` is looked up there first.
- ``cpu_dtype``       the compute dtype of ``auto`` on a CPU: ``auto`` (bfloat16 where the CPU
  computes it natively, else float32), ``bfloat16`` or ``float32``.

Execution (see ``docs/gpu-pool.md``):

- ``gpu_deployment``  unset: quantize + benchmark run inside the factory's own process (default).
  Set (e.g. ``gpu-stage/gpu``): they run as that Prefect deployment on the ``gpu`` work pool,
  one flow run per GPU, and the factory waits for it (``run_deployment``).
- ``gpu_timeout_s``   optional bound on that wait, queueing included (unset: wait; a dead
  worker's run is marked Crashed by the zombie-run automation, which ends the wait).
- ``gpu_poll_s``      seconds between state polls of the GPU stage's flow run.
- ``stage_store_url`` ``s3://bucket/prefix`` where every step output is uploaded (completion
  marker last) and from which other hosts fetch it; unset: step outputs stay in the local work
  dir, so a GPU pool needs a work dir shared by every host (``modelfactory/stage_store/``).
- ``stage_cache_dir`` this host's content-addressed cache of outputs fetched from the stage store,
  ``<home>/cache/stage`` (not under ``cache_dir``: that one is often a shared kernel-cache volume);
  ``stage_cache_max_gb`` its size bound (default 200 GB): least recently used entries that no
  running process uses are evicted to make room (``modelfactory/stage_store/cache.py``).
- ``claim_lease_s`` / ``claim_poll_s`` / ``claim_wait_s``  the run-key claim in the catalog that
  serialises identical runs across hosts: its lease (renewed by a heartbeat; a dead holder's claim
  expires after it; lease times are the database's clock), how often a waiting run asks again, and
  how long it waits at most (``modelfactory/catalog/claims.py``).

S3 (``modelfactory/s3/``; credentials come from the standard AWS chain, never from here):

- ``s3_endpoint_url``     S3-compatible endpoint; unset: ``AWS_ENDPOINT_URL`` if set, else AWS.
- ``s3_max_concurrency``  parallel part/file transfers; ``s3_part_size_mb`` multipart part size.
- ``hf_token_secret``  Prefect ``Secret`` block with the Hugging Face token (Hub downloads and ``hf://``
  publishing, ``modelfactory/hf/``);
  unset: ``HF_TOKEN`` (or the token saved by ``hf auth login``).

Triggers (``docs/triggers.md``):

- ``webhook_secret``       the Hugging Face webhook's secret (``X-Webhook-Secret``); unset: the
  webhook refuses every delivery (503), it never accepts unauthenticated ones.
- ``finetune_deployment``  ``flow/deployment`` the webhook and the nightly check start for a new commit.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELFACTORY_", frozen=True, extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".modelfactory")
    catalog_url: str | None = None
    store_url: str | None = None
    work_dir: Path | None = None
    cache_dir: Path | None = None
    data_dir: Path | None = None
    #: CPU threads GPTQModel may use (it refuses to start on 2 cores without this).
    cpu_workers: int = 2
    #: What ``dtype: auto`` computes in on a CPU (quantize, benchmark): ``auto`` is bfloat16 where the
    #: CPU has native bf16 instructions, else float32 (``modelfactory.core.devices.cpu_dtype``).
    cpu_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    #: Prefect deployment ("flow/deployment") that runs the GPU steps; unset = in-process.
    gpu_deployment: str | None = None
    #: Max seconds to wait for the GPU stage (queueing included); unset = no bound.
    gpu_timeout_s: float | None = Field(default=None, gt=0)
    #: Seconds between polls of the GPU stage's flow run state.
    gpu_poll_s: float = Field(default=2.0, gt=0)
    #: Checkpoint GPTQ quantization layer by layer (where GPTQModel supports it: Llama-family,
    #: true_sequential), so a killed quantization resumes instead of starting over. Off by default:
    #: GPTQModel needs its disk offload for it, which made 7B quantization on the H100 ~7x slower.
    quantize_checkpoints: bool = False
    #: Cap on the share of a GPU's memory one step may allocate (e.g. 0.5 to share a GPU between two
    #: runs); unset = all of it. Over the cap a step fails with a clear out-of-memory error.
    cuda_memory_fraction: float | None = Field(default=None, gt=0, le=1)
    #: Most members of a sweep that share one GPU at once in the sweep's own process: fewer where their measured
    #: memory does not fit (``modelfactory.core.gpu_share.members_per_gpu``); 1 = one after another. A timed
    #: decode always has the GPU to itself (``gpu_share.gpu_turn``). On the pool: MODELFACTORY_GPU_SLOTS.
    gpu_members_max: int = Field(default=2, ge=1, le=8)
    #: ``s3://bucket/prefix`` every step output moves through (hosts share no disk); unset = local work dir.
    stage_store_url: str | None = None
    #: Where this host keeps step outputs fetched from the stage store; unset = ``<home>/cache/stage``.
    stage_cache_dir: Path | None = None
    #: Size bound of that cache in GB (1e9 bytes): least recently used entries not in use are evicted.
    stage_cache_max_gb: float = Field(default=200.0, gt=0)
    #: Seconds a run-key claim lasts without a heartbeat (renewed every third of it).
    claim_lease_s: float = Field(default=60.0, ge=1)
    #: Seconds between claim attempts of a run waiting for an identical one.
    claim_poll_s: float = Field(default=2.0, gt=0)
    #: Longest a run waits for an identical one holding its run key before it fails with a clear error
    #: (default 6 h: the longest quantization plus benchmark of a large model on one GPU, with room).
    claim_wait_s: float = Field(default=6 * 3600.0, gt=0)
    #: S3-compatible endpoint (MinIO, moto, ...); unset = AWS_ENDPOINT_URL, else AWS itself.
    s3_endpoint_url: str | None = None
    #: Parallel S3 transfers (parts and files) per upload/download.
    s3_max_concurrency: int = Field(default=8, ge=1, le=64)
    #: Multipart part size (and threshold) in MiB.
    s3_part_size_mb: int = Field(default=8, ge=5, le=5120)
    #: Name of a Prefect ``Secret`` block holding AWS credentials as JSON (``aws_access_key_id``,
    #: ``aws_secret_access_key``, optional ``aws_session_token`` / ``region_name``); unset = the AWS chain.
    aws_credentials_secret: str | None = None
    #: Name of a Prefect ``Secret`` block holding the Hugging Face token; unset = ``HF_TOKEN``.
    hf_token_secret: str | None = None
    #: Secret the Hugging Face webhook sends in ``X-Webhook-Secret``; unset = refuse every delivery.
    webhook_secret: SecretStr | None = None
    #: Deployment started for a new commit of a watched repo (webhook and nightly check).
    finetune_deployment: str = "on-finetune/on-finetune"

    @property
    def resolved_catalog_url(self) -> str:
        return self.catalog_url or f"sqlite:///{self.home / 'catalog.db'}"

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or (self.home / "store").resolve().as_uri()

    @property
    def resolved_work_dir(self) -> Path:
        return self.work_dir or self.home / "work"

    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir or self.home / "cache"

    @property
    def resolved_stage_cache_dir(self) -> Path:
        return self.stage_cache_dir or self.home / "cache" / "stage"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings of this process (cached; call ``get_settings.cache_clear()`` in tests)."""
    return Settings()


@contextmanager
def environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (``None``: unset) environment variables for this process and the children it starts, with the
    settings cache cleared on the way in and out; the old values come back afterwards."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        _apply(values)
        get_settings.cache_clear()
        yield
    finally:
        _apply(saved)
        get_settings.cache_clear()


def _apply(values: Mapping[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
