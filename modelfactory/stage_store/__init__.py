"""The stage store: step outputs move between hosts by URI, through S3.

With ``MODELFACTORY_STAGE_STORE_URL=s3://bucket/prefix`` every step output folder (download,
merge, quantize, benchmark; keyed ``<step>/<key>`` as in the work dir) is uploaded there when
the step completes, its completion marker (a manifest: every file's sha256) written last. Step
records then carry ``s3://`` URIs instead of host paths, and a step that needs an input built
on another host fetches it into this host's content-addressed cache (``<home>/cache/stage``),
checked file by file. An output already complete in the store is reused, not rebuilt, on any
host. Hosts share nothing but the Prefect server, the catalog and the store.

Unset (the default), outputs stay in the local work dir and their URIs are local paths.

- :func:`find` / :func:`publish`   a step's complete output (reuse / after building it)
- :func:`discard`                  a step's output no longer reused, on any host (a measurement to refresh)
- :func:`share`                    a folder outside the work dir (local model, Hub snapshot) by URI
- :func:`resolve`                  a URI (or path) to a local folder
- :func:`write_record` / :func:`read_record`  small records every host reads (GPU-stage outcomes)

Modules: ``remote`` (the S3 layout, uploads, marker last), ``cache`` (the local cache), ``steps``.
"""

from modelfactory.stage_store.steps import (
    StepOutput,
    configured,
    discard,
    find,
    publish,
    read_record,
    record_location,
    resolve,
    share,
    write_record,
)

__all__ = ["StepOutput", "configured", "discard", "find", "publish", "read_record", "record_location", "resolve", "share",
           "write_record"]
