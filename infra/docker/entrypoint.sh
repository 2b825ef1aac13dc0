#!/bin/sh
# Entry point of the modelfactory worker image (infra/docker/Dockerfile), under tini.
#
# Runs its arguments: the image's CMD (a process worker on the `gpu` pool), a command given to
# `docker run` / compose (e.g. infra/gpu-host/start-workers.sh), or the flow-run command a
# Kubernetes worker puts in the job's args. A volume mounted where the factory writes may not be
# writable by this non-root user: say so now, not minutes into a run.
set -eu
for dir in "${MODELFACTORY_HOME:-}" "${MODELFACTORY_CACHE_DIR:-}" "${HF_HOME:-}"; do
  if [ -n "$dir" ] && ! { mkdir -p "$dir" 2>/dev/null && [ -w "$dir" ]; }; then
    echo "entrypoint: $dir is not a writable folder for uid $(id -u): make the volume writable for it (fsGroup/chown)" >&2
    exit 2
  fi
done
if [ "$#" -eq 0 ]; then
  set -- prefect worker start --pool gpu --type process --limit 1
fi
exec "$@"
