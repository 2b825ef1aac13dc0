"""S3 artifact store and model sources (boto3; any S3-compatible endpoint).

- :func:`publish_s3`   publish an artifact folder (staging, manifest last, ``latest.json``).
- :func:`verify_s3` / :func:`download_s3`  read an artifact back by its manifest, every sha256 checked.
- :func:`fetch_source` download a base model / adapter prefix into the keyed work dir.
- :func:`abort_stale_uploads`  abort multipart uploads a killed publish left behind.
"""

from modelfactory.s3.client import S3Url, make_client
from modelfactory.s3.fetch import download_s3, fetch_source, verify_s3
from modelfactory.s3.publish import abort_stale_uploads, publish_s3

__all__ = ["S3Url", "abort_stale_uploads", "download_s3", "fetch_source", "make_client", "publish_s3", "verify_s3"]
