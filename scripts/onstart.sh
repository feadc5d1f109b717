#!/bin/bash
# gpuq bootstrap for a rented GPU machine. The manager sends it packed in a small onstart stub
# (manager/bootstrap.py, which documents the variables). Idempotent: Vast runs it again when an outbid
# instance resumes, so every step checks before it acts and a second run starts no duplicate process.
# It installs exactly the manager's gpuq: a wheel checked against GPUQ_INSTALL_SHA256 before pip sees
# it, or a GPUQ_INSTALL_SPEC pinned with --hash; never a bare name ("gpuq" on PyPI is another project).
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
U="${GPUQ_INSTALL_URL:-}" H="${GPUQ_INSTALL_SHA256:-}" S="${GPUQ_INSTALL_SPEC:-}"
if [ -n "$U" ] && [[ "$H" =~ ^[0-9a-f]{64}$ ]]; then KEY="$H"
elif [ -z "$U" ] && [[ "$S" =~ ==.*--hash=sha256:[0-9a-f]{64} ]]; then KEY="$S"
else
  log "refusing to install gpuq unpinned: set GPUQ_INSTALL_URL and GPUQ_INSTALL_SHA256, or GPUQ_INSTALL_SPEC with --hash"
  exit 1
fi
if [ ! -x "$PY" ]; then
  log "creating $V"
  "${GPUQ_PYTHON:-python3}" -m venv "$V"
fi
if [ "$(cat "$V/installed" 2>/dev/null || true)" != "$KEY" ]; then  # in the venv: a new venv installs again
  log "installing gpuq"
  if [ -n "$U" ]; then
    F="${U%%[?#]*}"; F="$W/run/${F##*/}"  # pip needs the wheel's own file name
    curl -fsSL --retry 5 -o "$F" "$U"
    if ! echo "$H  $F" | sha256sum -c --status; then rm -f "$F"; log "refusing $U: sha256 is not $H"; exit 1; fi
    "$PY" -m pip install -q "$F"
  else
    echo "$S" >"$W/run/gpuq.req"
    "$PY" -m pip install -q --no-deps --require-hashes -r "$W/run/gpuq.req"
    "$PY" -m pip install -q "${S%% *}"  # its dependencies: the pinned gpuq is installed already
  fi
  echo "$KEY" >"$V/installed"
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
  # each model the workflows' bindings name, checked against its pinned sha256 (manager/bootstrap.py)
  "$PY" -m manager.bootstrap models "$COMFY" "${GPUQ_WORKFLOWS:-}"
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
