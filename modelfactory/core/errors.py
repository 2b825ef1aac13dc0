"""One error hierarchy for the whole factory.

Every message names what failed, the bad value, and what to do next. Wrap lower-level
exceptions with ``raise XError(...) from exc`` so the cause stays visible.

Only subclasses of :class:`TransientError` are retried by the Prefect tasks
(see :func:`is_transient`); everything else fails fast.
"""

from __future__ import annotations


class ModelFactoryError(Exception):
    """Base class of every error the factory raises on purpose."""

    #: Short machine-readable kind, stored in the catalog next to the message.
    kind: str = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # keep pickling (Prefect results, subprocess workers) simple
        return (type(self), (self.message,))


class SpecError(ModelFactoryError, ValueError):
    """A spec field is invalid (unsupported bits, unknown gate metric, malformed URI...)."""

    kind = "spec"


class SourceError(ModelFactoryError):
    """A base model or adapter cannot be found, resolved or read."""

    kind = "source"


class SourceNotFoundError(SourceError, FileNotFoundError):
    """A local path, Hub repo or revision does not exist."""

    kind = "source_not_found"


class AdapterMismatchError(ModelFactoryError):
    """An adapter does not fit the base model (architecture, module names or shapes)."""

    kind = "adapter_mismatch"


class MergeVerificationError(ModelFactoryError):
    """Merged and unmerged logits differ by more than the tolerance."""

    kind = "merge_verification"


class CalibrationError(ModelFactoryError):
    """The calibration text is missing, empty or too short for the requested samples."""

    kind = "calibration"


class QuantizationError(ModelFactoryError):
    """GPTQModel failed to quantize or save the model."""

    kind = "quantization"


class BenchmarkError(ModelFactoryError):
    """A benchmark measurement failed."""

    kind = "benchmark"


class HostCheckError(BenchmarkError):
    """A check could not run on this host for reasons of the host (no network for a kernel's sources, a missing
    toolchain, out of memory, a timeout): the artifact was not found broken, it was not verified here."""

    kind = "host"

class PublishError(ModelFactoryError):
    """Publishing an artifact failed."""

    kind = "publish"


class CatalogError(ModelFactoryError):
    """The catalog database cannot be reached, or its schema is not migrated."""

    kind = "catalog"


class CatalogQueryError(CatalogError, ValueError):
    """A catalog query was given a bad filter, sort key or threshold (the API answers 400)."""

    kind = "catalog_query"


class CatalogNotFoundError(CatalogError, LookupError):
    """A run, artifact or base model asked for is not in the catalog (the API answers 404)."""

    kind = "catalog_not_found"


class WorkerError(ModelFactoryError):
    """An isolated worker process died without reporting a result."""

    kind = "worker"


class GpuStageError(ModelFactoryError):
    """The GPU stage (quantize + benchmark on the ``gpu`` work pool) crashed, was cancelled or timed out."""

    kind = "gpu_stage"


class SweepAbortedError(ModelFactoryError):
    """A sweep failed before it decided what to publish; its members that passed their gate fail with it."""

    kind = "sweep_aborted"


class ClaimError(CatalogError):
    """The run-key claim that serialises identical runs could not be held: waited too long for its
    holder, or lost (its lease expired and another run took it)."""

    kind = "claim"


class CrashedError(ModelFactoryError):
    """A run's process died mid-run (killed, out of memory, host gone): found by Prefect's crash hook
    or by ``modelfactory catalog reconcile``."""

    kind = "crashed"


class StageStoreError(ModelFactoryError):
    """A step output could not be written to, found in, or fetched intact from the stage store."""

    kind = "stage_store"


class DiskFullError(ModelFactoryError, OSError):
    """A write ran out of disk space (or over a file size limit); partial output was removed."""

    kind = "disk_full"


class PublishDiskFullError(DiskFullError, PublishError):
    """The artifact store's disk filled up while publishing (a publish error and a disk-full error)."""

    kind = "disk_full"


class OutOfMemoryError(ModelFactoryError, MemoryError):
    """A step ran out of (GPU or host) memory; not retried: the same inputs would fail again."""

    kind = "out_of_memory"


class TriggerError(ModelFactoryError):
    """A webhook delivery or the nightly check could not start the build of a new commit."""

    kind = "trigger"


class NoPrefectServerError(TriggerError):
    """A trigger would start a build, but no Prefect server is configured (``PREFECT_API_URL``)."""

    kind = "no_prefect_server"


class DeployError(ModelFactoryError):
    """``modelfactory deploy`` could not apply the work pools, deployments or automations."""

    kind = "deploy"


class DeployOptionError(DeployError, ValueError):
    """A deploy option has a value the Prefect setup cannot use (pool type, zombie timeout...)."""

    kind = "deploy_option"


class DeploySourceError(DeployError):
    """The checkout lacks ``deployments/prefect.yaml`` or the Kubernetes job template, or they do not parse."""

    kind = "deploy_source"


class WorkPoolConflictError(DeployError):
    """A work pool of the factory exists on the Prefect server with another type."""

    kind = "work_pool_conflict"


class DeployCommandError(DeployError):
    """``prefect deploy`` on ``deployments/prefect.yaml`` failed or timed out."""

    kind = "deploy_command"


class PrefectApiError(DeployError):
    """The Prefect server could not be reached, or refused a setup request."""

    kind = "prefect_api"


class TransientError(ModelFactoryError):
    """A failure that may succeed on retry (network blip, 5xx, lock timeout)."""

    kind = "transient"


class HubUnavailableError(TransientError):
    """The Hugging Face Hub could not be reached, or answered 5xx / 429 (rate limited)."""

    kind = "hub_unavailable"


def is_transient(exc: BaseException) -> bool:
    """True when *exc* (or its cause chain) is worth retrying."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, TransientError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__
    return False


def error_kind(exc: BaseException) -> str:
    """The catalog's ``error_kind`` for an exception (``kind`` or the class name)."""
    return getattr(exc, "kind", None) or type(exc).__name__


def _all_subclasses(cls: type[ModelFactoryError]) -> list[type[ModelFactoryError]]:
    return [cls] + [sub for child in cls.__subclasses__() for sub in _all_subclasses(child)]


#: Name -> class, used to re-raise errors reported by worker subprocesses as the same class.
ERRORS_BY_NAME: dict[str, type[ModelFactoryError]] = {cls.__name__: cls for cls in _all_subclasses(ModelFactoryError)}
