"""S3 plumbing shared by publishing, verification and source downloads.

- :class:`S3Url` parses ``s3://bucket/prefix`` (the prefix is a "folder": it always ends in ``/``).
- :func:`make_client` builds a boto3 client from a Prefect ``Secret`` block
  (``MODELFACTORY_AWS_CREDENTIALS_SECRET``) or else the standard AWS credential chain
  (env vars, ``AWS_PROFILE``/config files, SSO, instance/container roles) with retries for
  throttling, 5xx and connection errors, and the endpoint from ``MODELFACTORY_S3_ENDPOINT_URL``
  (else boto3's own ``AWS_ENDPOINT_URL``). Credentials are never logged or stored.
- :func:`s3_errors` turns botocore/s3transfer exceptions into the factory's errors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlparse, urlunparse

from modelfactory.core.errors import (
    ModelFactoryError,
    PublishError,
    SpecError,
    TransientError,
)
from modelfactory.core.secrets import load_secret_block
from modelfactory.core.settings import get_settings

MIB = 1 << 20
#: Default boto3 attempts per request (standard mode: throttling, 5xx, connection errors, with backoff).
MAX_ATTEMPTS = 6
CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                    "TokenRefreshRequired", "AccessDenied", "AllAccessDisabled", "InvalidClientTokenId"}
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                   "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "BandwidthLimitExceeded"}
NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}


@dataclass(frozen=True)
class S3Url:
    bucket: str
    prefix: str  # "" or "a/b/" (always a folder)

    @classmethod
    def parse(cls, url: str) -> S3Url:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise SpecError(f"{url!r} is not an S3 URL: use s3://bucket/prefix")
        parts = [p for p in parsed.path.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise SpecError(f"S3 URL {url!r} has '.' or '..' in its path: use a plain prefix")
        return cls(parsed.netloc, "".join(f"{p}/" for p in parts))

    def key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    def child(self, *parts: str) -> S3Url:
        return S3Url(self.bucket, self.prefix + "".join(f"{p.strip('/')}/" for p in parts))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def max_attempts() -> int:
    """boto3 attempts per request: ``AWS_MAX_ATTEMPTS`` when set, else :data:`MAX_ATTEMPTS`."""
    try:
        return max(1, int(os.environ.get("AWS_MAX_ATTEMPTS") or MAX_ATTEMPTS))
    except ValueError as exc:
        raise SpecError(f"AWS_MAX_ATTEMPTS={os.environ['AWS_MAX_ATTEMPTS']!r} is not an integer: fix it") from exc


def endpoint_url() -> str | None:
    """The configured endpoint; ``None`` lets boto3 use ``AWS_ENDPOINT_URL(_S3)`` or AWS."""
    return get_settings().s3_endpoint_url or None


def redacted(url: str | None) -> str:
    """*url* without user:password (for messages and logs)."""
    if not url:
        return "AWS (default endpoint)"
    parsed = urlparse(url)
    host = parsed.hostname or ""
    netloc = host + (f":{parsed.port}" if parsed.port else "")
    return urlunparse(parsed._replace(netloc=netloc))


def transfer_config():
    from boto3.s3.transfer import TransferConfig

    settings = get_settings()
    part = settings.s3_part_size_mb * MIB
    return TransferConfig(multipart_threshold=part, multipart_chunksize=part,
                          max_concurrency=settings.s3_max_concurrency, use_threads=True,
                          preferred_transfer_client="classic")


def make_client():
    """A boto3 S3 client: standard credential chain, retries, configured endpoint."""
    import boto3
    from botocore.config import Config

    settings = get_settings()
    endpoint = endpoint_url()
    config = Config(
        retries={"max_attempts": max_attempts(), "mode": os.environ.get("AWS_RETRY_MODE") or "standard"},
        max_pool_connections=2 * settings.s3_max_concurrency + 4,  # transfers + listing/verify threads
        connect_timeout=10, read_timeout=120,
        # Custom endpoints (MinIO, moto) usually have no per-bucket DNS names.
        s3={"addressing_style": "path"} if endpoint else None,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_supported",
    )
    session = boto3.session.Session(**secret_block_credentials())
    return session.client("s3", endpoint_url=endpoint, config=config)


#: Keys a credentials Secret block may hold (boto3 ``Session`` arguments).
CREDENTIAL_KEYS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "region_name")


def _aws_credentials(value: object) -> dict[str, str] | None:
    """The boto3 ``Session`` arguments in a Secret block's value (a JSON object, or its text), else None."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict) or not {"aws_access_key_id", "aws_secret_access_key"} <= set(value):
        return None
    return {key: str(value[key]) for key in CREDENTIAL_KEYS if value.get(key)}


def secret_block_credentials() -> dict[str, str]:
    """AWS credentials from the Prefect ``Secret`` block named by ``MODELFACTORY_AWS_CREDENTIALS_SECRET``
    (a JSON object), or ``{}`` for boto3's standard chain. Values are never logged."""
    name = get_settings().aws_credentials_secret
    if not name:
        return {}
    return load_secret_block(name=name, setting="MODELFACTORY_AWS_CREDENTIALS_SECRET",
                             holds="a JSON object with aws_access_key_id and aws_secret_access_key",
                             fallback="the standard AWS credential chain", parse=_aws_credentials, error=SpecError)


def make_manager(client):
    from boto3.s3.transfer import create_transfer_manager

    return create_transfer_manager(client, transfer_config())


def error_code(exc: BaseException) -> str | None:
    """The S3 error code of *exc* or of an exception in its cause/context chain."""
    from botocore.exceptions import ClientError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ClientError):
            return str(exc.response.get("Error", {}).get("Code") or exc.response.get(
                "ResponseMetadata", {}).get("HTTPStatusCode") or "")
        exc = exc.__cause__ or exc.__context__
    return None


def _status(exc: BaseException) -> int | None:
    from botocore.exceptions import ClientError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ClientError):
            return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def s3_errors(what: str, *, url: str, fatal: type[ModelFactoryError],
              not_found: type[ModelFactoryError] | None = None) -> Iterator[None]:
    """Translate boto errors raised while doing *what* on *url* into factory errors.

    Credentials / missing bucket → *fatal*; a missing key → *not_found* (default *fatal*);
    connection errors, 5xx and throttling (after boto3's own retries) → :class:`TransientError`.
    """
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError,
        CredentialRetrievalError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )
    from s3transfer.exceptions import RetriesExceededError

    where = f"{url} (endpoint {redacted(endpoint_url())})"
    try:
        yield
    except ModelFactoryError:
        raise
    except (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError) as exc:
        raise fatal(f"{what} {where}: no usable AWS credentials ({type(exc).__name__}); set "
                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role") from exc
    except (ConnectionError, ReadTimeoutError, RetriesExceededError) as exc:
        raise TransientError(f"{what} {where} failed after {max_attempts()} attempts: cannot reach S3 "
                             f"({type(exc).__name__}); check the endpoint and network, then retry") from exc
    except (ClientError, Boto3Error, BotoCoreError) as exc:
        code, status = error_code(exc) or "", _status(exc)
        if code == "NoSuchBucket":
            raise fatal(f"{what} {where}: bucket {S3Url.parse(url).bucket!r} does not exist; "
                        "create it or fix the URL") from exc
        if code in CREDENTIAL_CODES or status == 403:
            raise fatal(f"{what} {where}: S3 refused the credentials ({code or status}); check "
                        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE and the bucket policy") from exc
        if code in NOT_FOUND_CODES or status == 404:
            raise (not_found or fatal)(f"{what} {where}: object not found ({code or status}); "
                                       "check the URL") from exc
        if code in TRANSIENT_CODES or (status is not None and status >= 500):
            raise TransientError(f"{what} {where}: S3 error {code or status} persisted after "
                                 f"{max_attempts()} attempts; retry later") from exc
        raise fatal(f"{what} {where} failed: {exc}") from exc


#: The pointer object a published model folder keeps to its newest artifact.
LATEST = "latest.json"


def check_bucket(client, url: S3Url, *, fatal: type[ModelFactoryError] = PublishError,
                 missing: type[ModelFactoryError] | None = None) -> None:
    """Fail clearly when the bucket is missing (*missing*, default *fatal*) or the credentials cannot use it."""
    from botocore.exceptions import ClientError

    with s3_errors("checking bucket of", url=str(url), fatal=fatal):
        try:
            client.head_bucket(Bucket=url.bucket)
        except ClientError as exc:  # HEAD has no error body: 404 is the only hint of a missing bucket
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                raise (missing or fatal)(f"bucket {url.bucket!r} of {url} does not exist: create it or fix "
                                         "the URL") from exc
            raise


def read_object(client, *, bucket: str, key: str) -> bytes | None:
    """The bytes of ``bucket/key``, or ``None`` when there is no such object."""
    from botocore.exceptions import ClientError

    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
