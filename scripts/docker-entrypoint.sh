#!/usr/bin/env bash
# The image's entrypoint (/opt/dysco/bin/docker-entrypoint.sh): dysco-server with its flags from
#   1. the environment: every DYSCO_<FLAG>=value becomes --<flag>=value (lower case, '_' -> '-'), e.g.
#      DYSCO_MAX_BATCH=8 -> --max-batch=8, DYSCO_TLS_CERT=/etc/dysco/tls/tls.crt -> --tls-cert=...;
#   2. a mounted config: /etc/dysco/dysco-server.yaml (or DYSCO_CONFIG=FILE) is passed as --config;
#   3. the arguments after the image name (`docker run IMAGE --log-level debug`).
# Precedence is the server's: flags (environment and arguments) win over the config file's keys, and the
# arguments come last, so they win over the environment. Without a model from any of them, the package
# baked into the image (/opt/dysco/models/smollm2-135m-instruct) is served.
# An unknown DYSCO_ variable is an error of the server ("unknown flag"), not ignored: on Kubernetes keep
# enableServiceLinks: false (as deploy/kubernetes/base does), else a Service named "dysco" would inject
# DYSCO_PORT=tcp://... (the base Deployment sets command/args itself and does not use this entrypoint).
# A first argument that is not a flag runs that command instead (`docker run IMAGE dysco-client health`,
# `docker run -it IMAGE bash`). `exec` keeps dysco-server PID 1, so `docker stop`'s SIGTERM reaches it and
# drains.
set -euo pipefail
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  exec "$@"
fi
DEFAULT_MODEL=/opt/dysco/models/smollm2-135m-instruct
args=()
config=${DYSCO_CONFIG:-}
if [ -z "$config" ] && [ -f /etc/dysco/dysco-server.yaml ]; then
  config=/etc/dysco/dysco-server.yaml
fi
[ -n "$config" ] && args+=("--config=$config")
have_model=0
while IFS='=' read -r name value; do
  case "$name" in
    DYSCO_CONFIG) continue ;;
    DYSCO_MODEL) have_model=1 ;;
  esac
  flag=${name#DYSCO_}
  flag=${flag,,}
  args+=("--${flag//_/-}=$value")
done < <(env | grep -E '^DYSCO_[A-Z0-9_]+=' | sort)
for a in "$@"; do
  case "$a" in --model|--model=*) have_model=1 ;; esac
done
if [ "$have_model" = 0 ] && { [ -z "$config" ] || ! grep -Eq '^[[:space:]]*model[[:space:]]*:' "$config"; }; then
  args=("--model=$DEFAULT_MODEL" "${args[@]}")
fi
exec /opt/dysco/bin/dysco-server "${args[@]}" "$@"
