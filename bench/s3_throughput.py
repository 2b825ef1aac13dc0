"""S3 upload/download throughput: the factory's transfer path vs plain boto3 defaults, on a local moto server.

    .venv/bin/python bench/s3_throughput.py [--repeats 3] [--big-mb 1024] [--artifact DIR]

Two payloads:

- a SmolLM2-135M GPTQ-4bit-g128-shaped folder (``--artifact DIR`` to use a real one; default: a
  synthetic folder with the same file layout and sizes, random bytes: 113 MB model.safetensors +
  config/tokenizer files),
- one ~1 GB file.

Measured per payload (best of ``--repeats``, MB/s = 1e6 bytes/s):

- ``factory_upload``: ``modelfactory.s3.folders.upload_folder`` (transfer manager, all files at
  once, ``MODELFACTORY_S3_PART_SIZE_MB`` parts, ``MODELFACTORY_S3_MAX_CONCURRENCY`` threads,
  SHA-256 checksum per part),
- ``factory_publish`` (folder only): the whole ``publish_s3`` (staging upload, server-side copy
  into place, manifest, latest.json),
- ``factory_download``: the transfer manager download (``ChecksumMode=ENABLED``), and
  ``factory_download_verified``: ``download_s3`` (download + sha256 of every file vs manifest),
- ``plain_upload`` / ``plain_download``: ``client.upload_file`` / ``client.download_file`` with
  boto3's defaults, one file after the other (what ``aws s3 cp`` does per file).
- ``*_download_single_get``: the same downloads with one GET per file. moto serves every
  *ranged* GET by reading and copying the whole object (``FakeKey.value`` then a slice), so the
  parallel ranged downloads of a 1 GiB object cost O(size) per 8 MiB part on moto — an artifact
  of the test server, not of S3/MinIO; the single-GET numbers show the client side.

moto keeps objects in memory (~4x their size at peak) and, like the client, runs on this
machine's CPUs, so absolute numbers are CPU-bound; the ratios are the point. Writes
``bench/results/s3-throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, not another install

#: File layout of the SmolLM2-135M-Instruct GPTQ 4-bit g128 artifact (sizes in bytes, rounded).
SMOLLM2_GPTQ_LAYOUT = {
    "model.safetensors": 113_000_000,
    "tokenizer.json": 2_104_556,
    "tokenizer_config.json": 3_764,
    "config.json": 1_460,
    "quantize_config.json": 560,
    "generation_config.json": 132,
    "special_tokens_map.json": 655,
    "chat_template.jinja": 373,
}


def synthetic_folder(folder: Path, layout: dict[str, int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in layout.items():
        with open(folder / name, "wb") as fh:
            left = size
            while left:
                chunk = os.urandom(min(left, 8 << 20))
                fh.write(chunk)
                left -= len(chunk)
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def empty_bucket(client, bucket: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if objects:
            client.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})


def single_stream_parts(size: int):
    """Part size above *size*: the factory's transfers use one request per file."""
    from modelfactory.testing.env import settings_env

    return settings_env(MODELFACTORY_S3_PART_SIZE_MB=str(min(5120, size // (1 << 20) + 1)))


def measure(label: str, folder: Path, *, server, repeats: int, ranged_repeats: int, publish: bool) -> dict:
    from modelfactory.core.manifest import artifact_files, build_manifest
    from modelfactory.publishing.s3 import publish_s3
    from modelfactory.s3 import S3Url, download_s3, make_client
    from modelfactory.s3.folders import download_files, upload_folder

    size = folder_bytes(folder)
    files = artifact_files(folder)
    rels = [f.relative_to(folder).as_posix() for f in files]
    plain = server.client()  # boto3 defaults (8 MiB parts, 10 threads, default checksums)
    client = make_client()
    bucket = f"bench-{label}"
    plain.create_bucket(Bucket=bucket)
    out: dict = {"payload": label, "files": len(files), "bytes": size}
    scratch = Path(tempfile.mkdtemp(prefix="s3bench-"))

    def mbps(seconds: float) -> float:
        return round(size / 1e6 / seconds, 1)

    try:
        dest = S3Url(bucket, "factory/")
        out["factory_upload_MBps"] = mbps(best(lambda: upload_folder(
            client, folder=folder, files=rels, dest=dest, marker_key=dest.key("_bench.json"), marker=b"{}",
            private=False), repeats))
        out["factory_download_MBps"] = mbps(best(
            lambda: (shutil.rmtree(scratch / "f", ignore_errors=True),
                     download_files(client, source=dest, files=rels, dest=scratch / "f")), ranged_repeats))
        shutil.rmtree(scratch / "f", ignore_errors=True)

        def plain_up():
            for file, rel in zip(files, rels):
                plain.upload_file(str(file), bucket, f"plain/{rel}")

        def plain_down():
            shutil.rmtree(scratch / "p", ignore_errors=True)
            for rel in rels:
                (scratch / "p" / rel).parent.mkdir(parents=True, exist_ok=True)
                plain.download_file(bucket, f"plain/{rel}", str(scratch / "p" / rel))

        out["plain_upload_MBps"] = mbps(best(plain_up, repeats))
        out["plain_download_MBps"] = mbps(best(plain_down, ranged_repeats))
        shutil.rmtree(scratch / "p", ignore_errors=True)

        # moto answers every ranged GET by copying the whole object, so parallel ranged downloads of a
        # big object cost O(size) per part there (not on S3/MinIO): also measure one GET per file.
        from boto3.s3.transfer import TransferConfig

        single = TransferConfig(multipart_threshold=max(size, 1 << 30) + 1)
        with single_stream_parts(size):
            stream_client = make_client()
            out["factory_download_single_get_MBps"] = mbps(best(
                lambda: (shutil.rmtree(scratch / "s", ignore_errors=True),
                         download_files(stream_client, source=dest, files=rels, dest=scratch / "s")), repeats))
        shutil.rmtree(scratch / "s", ignore_errors=True)

        def plain_single_down():
            shutil.rmtree(scratch / "p", ignore_errors=True)
            for rel in rels:
                (scratch / "p" / rel).parent.mkdir(parents=True, exist_ok=True)
                plain.download_file(bucket, f"factory/{rel}", str(scratch / "p" / rel), Config=single)

        out["plain_download_single_get_MBps"] = mbps(best(plain_single_down, repeats))
        shutil.rmtree(scratch / "p", ignore_errors=True)
        empty_bucket(plain, bucket)

        if publish:
            manifest = build_manifest(folder, name="smollm2", config="gptq-4bit-128g", key="bench")
            times = []
            for i in range(repeats):
                parts = ("smollm2", "gptq-4bit-128g", f"bench{i}")
                started = time.perf_counter()
                pub = publish_s3(source=folder, url=f"s3://{bucket}/store", parts=parts, manifest=manifest)
                times.append(time.perf_counter() - started)
            out["factory_publish_MBps"] = mbps(min(times))
            out["factory_download_verified_MBps"] = mbps(best(
                lambda: (shutil.rmtree(scratch / "v", ignore_errors=True),
                         download_s3(url=pub.uri, dest=scratch / "v")), repeats))
        out["upload_ratio_factory_vs_plain"] = round(out["factory_upload_MBps"] / out["plain_upload_MBps"], 2)
        out["download_ratio_factory_vs_plain"] = round(out["factory_download_MBps"] / out["plain_download_MBps"], 2)
    finally:
        empty_bucket(plain, bucket)
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big-mb", type=int, default=1024, help="size of the single big file (0: skip)")
    parser.add_argument("--big-ranged-repeats", type=int, default=1,
                        help="repeats of the (slow on moto) parallel ranged downloads of the big file")
    parser.add_argument("--artifact", type=Path, help="a real GPTQ artifact folder (default: synthetic layout)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "s3-throughput.json")
    args = parser.parse_args()

    from modelfactory.core.log import get_logger
    from modelfactory.core.settings import get_settings
    from modelfactory.testing.s3_server import MotoS3, s3_environment

    get_logger().setLevel("WARNING")
    work = Path(tempfile.mkdtemp(prefix="s3bench-data-"))
    server = MotoS3()
    results = []
    try:
        with s3_environment(server.url):
            settings = get_settings()
            if args.artifact:
                folder, kind = args.artifact, f"real artifact {args.artifact}"
            else:
                folder = synthetic_folder(work / "smollm2-gptq", SMOLLM2_GPTQ_LAYOUT)
                kind = "synthetic: SmolLM2-135M GPTQ-4bit-g128 file layout and sizes, random bytes"
            results.append({**measure("smollm2-gptq", folder, server=server, repeats=args.repeats,
                                      ranged_repeats=args.repeats, publish=True), "source": kind})
            if args.big_mb:
                big = synthetic_folder(work / "big", {"big.bin": args.big_mb * (1 << 20)})
                results.append(measure("big-file", big, server=server, repeats=args.repeats,
                                       ranged_repeats=args.big_ranged_repeats, publish=False))
                shutil.rmtree(big)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "command": " ".join([".venv/bin/python", "bench/s3_throughput.py", *sys.argv[1:]]),
        "endpoint": "moto server (python -m moto.server) on 127.0.0.1, objects in memory",
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "factory_transfer": {"part_size_mb": settings.s3_part_size_mb, "max_concurrency": settings.s3_max_concurrency,
                             "checksum": "SHA256 per part"},
        "plain": "boto3 client.upload_file/download_file defaults (8 MiB parts, 10 threads), one file at a time",
        "repeats": args.repeats, "metric": "best of repeats, MB/s (1e6 bytes/s)",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
