"""Secrets never leak: full factory runs with a Hub token, AWS keys, a webhook secret and a database
password, then every output is searched for them — logs (ours, Prefect's, the step workers'),
Prefect flow runs and artifacts, model cards and manifests on the Hub and in S3, every file the
factory wrote, and every row of the catalog.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from modelfactory.core.errors import ModelFactoryError
from modelfactory.interfaces.runner import run_factory
from modelfactory.testing.catalog import postgres_schema_url
from modelfactory.testing.env import own_work_dir, settings_env
from modelfactory.testing.hub_server import OWNER, WRITE_TOKEN, upload_model
from modelfactory.testing.models import TINY_GATE, make_lora, tiny_spec
from modelfactory.testing.s3_server import s3_environment

pytestmark = pytest.mark.postgres

AWS_KEY_ID = "AKIAMFSECRETKEYID0042"
AWS_SECRET = "mf-aws-secret-access-key-5c2b6e9d0f"
DB_PASSWORD = "mf-db-password-8d1e77a3"
WEBHOOK_SECRET = "mf-webhook-secret-2a9c4b"
WRONG_HF_TOKEN = "hf_modelfactoryWrongToken000000000099"


class Collect(logging.Handler):
    """Every log record of every logger, formatted (exception text included)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def files_under(*roots: Path) -> Iterator[Path]:
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                yield path


def catalog_dump(url: str) -> str:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return "\n".join(
                repr(row) for table in inspect(conn).get_table_names()
                for row in conn.execute(text(f'SELECT * FROM "{table}"'))
            )
    finally:
        engine.dispose()


def prefect_records() -> str:
    """Every flow run (parameters, state messages) and artifact the Prefect API holds, as JSON."""
    from prefect.client.orchestration import get_client

    async def read() -> str:
        async with get_client() as client:
            runs = await client.read_flow_runs()
            artifacts = await client.read_artifacts()
            task_runs = await client.read_task_runs()
        dump = [r.model_dump(mode="json") for r in [*runs, *artifacts, *task_runs]]
        return json.dumps(dump)

    return asyncio.run(read())


def test_no_secret_appears_in_any_output(prefect, local_hub, moto_s3, tiny_llama, tmp_path, capfd):
    from fastapi.testclient import TestClient

    from modelfactory.interfaces.server import create_app

    secrets = {"HF token": WRITE_TOKEN, "wrong HF token": WRONG_HF_TOKEN, "AWS key id": AWS_KEY_ID,
               "AWS secret": AWS_SECRET, "DB password": DB_PASSWORD, "webhook secret": WEBHOOK_SECRET}
    collect = Collect()
    logging.getLogger().addHandler(collect)
    lora = make_lora(tiny_llama, tmp_path / "lora", seed=7)
    base_repo, lora_repo = f"{OWNER}/secret-base", f"{OWNER}/secret-lora"
    upload_model(local_hub, tiny_llama, base_repo)
    upload_model(local_hub, lora, lora_repo)
    bucket = "mf-secrets"
    try:
        with postgres_schema_url() as pg, s3_environment(moto_s3.url, AWS_ACCESS_KEY_ID=AWS_KEY_ID,
                                                         AWS_SECRET_ACCESS_KEY=AWS_SECRET), \
                own_work_dir(tmp_path / "work") as work:
            catalog_url = make_url(pg).set(password=DB_PASSWORD).render_as_string(hide_password=False)
            moto_s3.client(aws_access_key_id=AWS_KEY_ID, aws_secret_access_key=AWS_SECRET).create_bucket(
                Bucket=bucket)
            with settings_env(MODELFACTORY_CATALOG_URL=catalog_url, MODELFACTORY_WEBHOOK_SECRET=WEBHOOK_SECRET,
                     MODELFACTORY_STORE_URL=(tmp_path / "store").as_uri()):
                common = dict(adapters=[{"uri": f"hf://{lora_repo}"}], gate=TINY_GATE)
                to_hub = run_factory(tiny_spec(base_repo, name="to-hub", **common,
                                               publish={"destination": f"hf://{OWNER}/secret-gptq"}))
                to_s3 = run_factory(tiny_spec(base_repo, name="to-s3", **common,
                                              publish={"destination": f"s3://{bucket}/models"}))
                assert to_hub.status == to_s3.status == "passed"
                with settings_env(HF_TOKEN=WRONG_HF_TOKEN), pytest.raises(ModelFactoryError):  # error paths, too
                    run_factory(tiny_spec(base_repo, name="bad-token", **common,
                                          publish={"destination": f"hf://{OWNER}/secret-gptq-2"}))
                client = TestClient(create_app())
                for secret in (WEBHOOK_SECRET + "x", WEBHOOK_SECRET):
                    response = client.post("/hooks/huggingface", headers={"X-Webhook-Secret": secret},
                                           json={"event": {"action": "update", "scope": "repo.content"},
                                                 "repo": {"type": "model", "name": "nobody/watched"}})
                    collect.lines.append(f"webhook answer {response.status_code}: {response.text}")
                catalog_text = catalog_dump(catalog_url)
            s3_objects = moto_s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])
            s3_text = [moto_s3.client().get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in s3_objects]
            assert any(o["Key"].endswith("manifest.json") for o in s3_objects)
            outputs: dict[str, bytes] = {
                "logs": "\n".join(collect.lines).encode(),
                "stdout/stderr": "".join(capfd.readouterr()).encode(),
                "catalog": catalog_text.encode(),
                "prefect flow runs, task runs and artifacts": prefect_records().encode(),
                **{f"s3 object {o['Key']}": body for o, body in zip(s3_objects, s3_text)},
            }
            from huggingface_hub import hf_hub_download

            for name in ("README.md", "manifest.json"):  # the Hub stores blobs by hash: read them back
                path = hf_hub_download(f"{OWNER}/secret-gptq", name, revision="gptq-4bit-32g", token=WRITE_TOKEN,
                                       cache_dir=tmp_path / "hf-readback")
                outputs[f"hub {name}"] = Path(path).read_bytes()
            roots = [work, tmp_path / "store", Path(os.environ["MODELFACTORY_HOME"]), local_hub.store.root]
            for path in files_under(*roots):
                outputs[str(path)] = path.read_bytes()
    finally:
        logging.getLogger().removeHandler(collect)

    assert b"base_model_relation: quantized" in outputs["hub README.md"], "the model card was searched"
    assert len(outputs) > 50
    leaks = [f"{what} in {where}" for where, data in outputs.items() for what, secret in secrets.items()
             if secret.encode() in data]
    assert not leaks, "secrets leaked:\n" + "\n".join(leaks)
