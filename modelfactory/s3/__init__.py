"""S3 access shared by sources and publishing (boto3; any S3-compatible endpoint).

- :func:`make_client` / :class:`S3Url`  a configured client and a parsed ``s3://`` URL.
- :func:`verify_s3` / :func:`download_s3`  read an artifact back by its manifest, every sha256 checked.
- :func:`fetch_source` download a base model / adapter prefix into the keyed work dir.

- :mod:`~modelfactory.s3.folders`  the one S3 "folder, marker last" uploader (stage store and publishing).

Publishing to S3 (content-keyed, manifest last, ``latest.json``) is :mod:`modelfactory.publishing.s3`.
"""

from modelfactory.s3.client import S3Url, make_client
from modelfactory.s3.fetch import download_s3, fetch_source, verify_s3

__all__ = ["S3Url", "download_s3", "fetch_source", "make_client", "verify_s3"]
