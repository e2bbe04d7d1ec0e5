#!/bin/sh
# The worker image's entrypoint: a Prefect worker for $FTPIPE_WORK_POOL, or the command a work pool's job passes.
set -eu
if [ "$#" -eq 0 ]; then
    exec prefect worker start --pool "${FTPIPE_WORK_POOL:?set FTPIPE_WORK_POOL to the work pool this worker serves}"
fi
exec "$@"
