#!/usr/bin/env bash
# Start the MLflow tracking server (runs, registry, proxied artifacts) that the ranks' rank 0 and the
# registry consumers talk to. Runs in the foreground (exec): stop it with Ctrl-C or `kill <pid>`.
#
#   cluster/start_mlflow_server.sh                    # 127.0.0.1:5000, sqlite:///$PWD/mlflow.db, ./mlartifacts
#   DPREC_MLFLOW_PORT=5050 DPREC_MLFLOW_BACKEND=sqlite:////shared/mlflow/mlflow.db \
#   DPREC_MLFLOW_ARTIFACTS=/shared/mlflow/artifacts cluster/start_mlflow_server.sh
#
# Every training node then sets   export MLFLOW_TRACKING_URI=http://<this host>:<port>
# (for DeepSpeed multi-node runs put that line in .deepspeed_env), and dprec.tracking
# (runs and registry) / `mlflow models serve -m models:/dprec-<dataset>@champion` use the server.
#
# Settings (environment, defaults in brackets):
#   DPREC_MLFLOW_HOST        interface to bind [127.0.0.1]. On a real cluster use 0.0.0.0 so that
#                            the other nodes reach it, but only on a network behind a firewall
#                            (the server has no authentication), and list the names the nodes use
#                            in DPREC_MLFLOW_ALLOWED_HOSTS.
#   DPREC_MLFLOW_PORT        [5000]
#   DPREC_MLFLOW_BACKEND     backend + registry store [sqlite:///$PWD/mlflow.db]; for many writers
#                            prefer postgresql://user@db-host/mlflow
#   DPREC_MLFLOW_ARTIFACTS   where the server stores artifacts it proxies [$PWD/mlartifacts];
#                            any URI MLflow accepts (s3://bucket/prefix, a shared file system path)
#   DPREC_MLFLOW_WORKERS     server worker processes [1]
#   DPREC_MLFLOW_ALLOWED_HOSTS  Host headers accepted, e.g. "mlflow-head,10.0.0.*:5000"
#                            [MLflow's default: localhost and private IPs]
set -euo pipefail

HOST=${DPREC_MLFLOW_HOST:-127.0.0.1}
PORT=${DPREC_MLFLOW_PORT:-5000}
BACKEND=${DPREC_MLFLOW_BACKEND:-sqlite:///$PWD/mlflow.db}
ARTIFACTS=${DPREC_MLFLOW_ARTIFACTS:-$PWD/mlartifacts}
WORKERS=${DPREC_MLFLOW_WORKERS:-1}
export MLFLOW_DISABLE_TELEMETRY=${MLFLOW_DISABLE_TELEMETRY:-true}

args=(server --host "$HOST" --port "$PORT" --workers "$WORKERS"
      --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS")
if [[ -n "${DPREC_MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  args+=(--allowed-hosts "$DPREC_MLFLOW_ALLOWED_HOSTS")
fi

if [[ "$HOST" == "0.0.0.0" ]]; then client_host=$(hostname -f); else client_host=$HOST; fi
echo "MLFLOW_TRACKING_URI=http://$client_host:$PORT   (backend $BACKEND, artifacts $ARTIFACTS)"
exec mlflow "${args[@]}"
