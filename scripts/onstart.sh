#!/bin/bash
# gpuq bootstrap for a rented GPU machine. The manager sends it packed in a small onstart stub
# (manager/bootstrap.py). Idempotent: Vast runs it again when an outbid instance resumes, so every step
# checks before it acts and a second run starts no duplicate process.
#
# Configured only by environment (set by the manager as the instance's env):
#   DATABASE_URL               the gpuq_worker role's URL (required)
#   GPUQ_QUEUES                queues to serve, comma-separated (required)
#   GPUQ_PROVIDER              vast | aws_spot | local
#   GPUQ_PROVIDER_INSTANCE_ID  default: $CONTAINER_ID on Vast, the instance id from IMDS on EC2
#   GPUQ_BACKENDS              e.g. comfyui,f5tts; comfyui installs ComfyUI through comfy-cli
#   GPUQ_COMFYUI_VERSION       the ComfyUI release comfy-cli installs (default latest: the newest stable)
#   GPUQ_WORKFLOWS             workflow names whose <name>.binding.json models are downloaded
#   GPUQ_WORKFLOWS_DIR         where the binding files are (default: workflows/ beside the gpuq package)
#   GPUQ_INSTALL_SPEC          pip spec of gpuq: a wheel URL or git+https URL (default gpuq)
#   GPUQ_STORAGE_URL and storage credentials: read by the worker only
#   GPUQ_WORKSPACE             default /workspace; everything goes under $GPUQ_WORKSPACE/gpuq
#   GPUQ_PYTHON                the Python to build the venv with (default python3)
#   GPUQ_WORKER_CMD            the worker command (default: <venv>/bin/python -m gpuq.cli worker)
#   GPUQ_ORPHAN_TIMEOUT_SECONDS, GPUQ_SELF_TERMINATE_CMD  the worker's orphan check (README)
# Nothing here prints the environment: the host can read it anyway, the logs need not carry it.
set -euo pipefail

W="${GPUQ_WORKSPACE:-/workspace}/gpuq"
V="$W/venv"
PY="$V/bin/python"
mkdir -p "$W/run" "$W/models"
log() { echo "$(date -u +%FT%TZ) onstart: $*"; }

: "${DATABASE_URL:?DATABASE_URL must be set}"
: "${GPUQ_QUEUES:?GPUQ_QUEUES must be set}"
BACKENDS=",${GPUQ_BACKENDS:-},"

if [ -z "${GPUQ_PROVIDER_INSTANCE_ID:-}" ]; then
  if [ -n "${CONTAINER_ID:-}" ]; then
    GPUQ_PROVIDER_INSTANCE_ID="$CONTAINER_ID"
  elif [ "${GPUQ_PROVIDER:-}" = aws_spot ]; then
    T=$(curl -fsS -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' \
      http://169.254.169.254/latest/api/token || true)
    GPUQ_PROVIDER_INSTANCE_ID=$(curl -fsS -H "X-aws-ec2-metadata-token: $T" \
      http://169.254.169.254/latest/meta-data/instance-id || true)
  fi
fi
export GPUQ_PROVIDER_INSTANCE_ID="${GPUQ_PROVIDER_INSTANCE_ID:-}"

# One run at a time: a resume may start this while an earlier run still installs.
exec 9>"$W/run/onstart.lock"
if command -v flock >/dev/null; then flock 9; fi

# --- install what is missing ---------------------------------------------------------------------
if [ ! -x "$PY" ]; then
  log "creating $V"
  "${GPUQ_PYTHON:-python3}" -m venv "$V"
fi
SPEC="${GPUQ_INSTALL_SPEC:-gpuq}"
if [ "$(cat "$W/run/installed" 2>/dev/null || true)" != "$SPEC" ]; then
  log "installing gpuq ($SPEC)"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "$SPEC"
  echo "$SPEC" >"$W/run/installed"
fi

COMFY="$W/ComfyUI"
if [[ "$BACKENDS" == *,comfyui,* ]]; then
  if [ ! -f "$COMFY/main.py" ]; then
    log "installing ComfyUI with comfy-cli"
    "$PY" -m pip install -q comfy-cli
    # A stable release, not comfy-cli's default (master's latest commit); no ComfyUI-Manager (a headless
    # worker has no use for it, and it lengthens the billed boot). comfy-cli picks the CUDA wheel that
    # the host's driver supports.
    "$V/bin/comfy" --skip-prompt --workspace "$COMFY" install --nvidia --skip-manager \
      --version "${GPUQ_COMFYUI_VERSION:-latest}"
  fi
  WF="${GPUQ_WORKFLOWS_DIR:-$("$PY" -c 'import pathlib, worker; print(pathlib.Path(worker.__file__).resolve().parent.parent / "workflows")' 2>/dev/null || true)}"
  for name in ${GPUQ_WORKFLOWS//,/ }; do
    binding="$WF/$name.binding.json"
    if [ ! -f "$binding" ]; then log "no binding file $binding; skipping its models"; continue; fi
    # one "path url" line per model the workflow needs
    "$PY" -c 'import json, sys
for m in json.load(open(sys.argv[1])).get("models", []): print(m["path"], m["url"])' "$binding" |
      while read -r path url; do
        dest="$COMFY/$path"
        if [ -s "$dest" ]; then continue; fi
        log "downloading $path"
        mkdir -p "$(dirname "$dest")"
        curl -fL --retry 5 -C - -o "$dest.part" "$url" && mv "$dest.part" "$dest"
      done
  done
fi

# --- start, once ---------------------------------------------------------------------------------
# keep NAME CMD...: run CMD under a restart loop in the background, unless NAME's loop is alive.
# The pid file holds the loop's pid; a stale one (after a reboot or an outbid stop) is replaced.
alive() {  # a running process, not a zombie left unreaped by the container's init
  local s
  s=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1) || return 1
  [ -n "$s" ] && [ "$s" != Z ]
}
keep() {
  local name="$1"; shift
  local pidfile="$W/run/$name.pid"
  if [ -f "$pidfile" ] && alive "$(cat "$pidfile")"; then
    log "$name already running (pid $(cat "$pidfile"))"
    return 0
  fi
  log "starting $name"
  # exit 0 means "asked to stop" (drained, shut down): only a crash restarts
  nohup bash -c 'until "$@"; do echo "exited with $?; restarting in 5 s"; sleep 5; done' \
    "$name" "$@" >>"$W/$name.log" 2>&1 9>&- &
  echo $! >"$pidfile"
}

if [[ "$BACKENDS" == *,comfyui,* ]]; then
  keep comfyui "$PY" "$COMFY/main.py" --listen 127.0.0.1 --port 8188
  for _ in $(seq 1 120); do
    if curl -fsS http://127.0.0.1:8188/system_stats >/dev/null 2>&1; then break; fi
    sleep 5
  done
  # the worker removes each job's files from ComfyUI's input/ and output/ (the base directory)
  export COMFYUI_URL="${COMFYUI_URL:-http://127.0.0.1:8188}" COMFYUI_BASE_DIR="${COMFYUI_BASE_DIR:-$COMFY}"
fi

if [ -n "${GPUQ_ORPHAN_TIMEOUT_SECONDS:-}" ] && [ -z "${GPUQ_SELF_TERMINATE_CMD:-}" ]; then
  case "${GPUQ_PROVIDER:-}" in  # how this machine ends itself
    vast) GPUQ_SELF_TERMINATE_CMD="VAST_API_KEY=\"\$CONTAINER_API_KEY\" '$V/bin/vastai' destroy instance \"\$CONTAINER_ID\" -y" ;;
    aws_spot) GPUQ_SELF_TERMINATE_CMD="shutdown -h now" ;;  # the instance terminates on shutdown
  esac
  export GPUQ_SELF_TERMINATE_CMD
fi

# shellcheck disable=SC2086  # GPUQ_WORKER_CMD is a command line
keep worker ${GPUQ_WORKER_CMD:-"$PY" -m gpuq.cli worker}
log "done"
