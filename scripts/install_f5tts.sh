#!/usr/bin/env bash
# Install the F5-TTS backend's runtime into a virtual environment: ./scripts/install_f5tts.sh .venv/bin/python [cpu|cuda]
#
# Why not a plain `pip install f5-tts`: it pulls gradio and a CUDA build of torch (several GB). On CPU we keep
# torch 2.13.0 (CPU build) and torchaudio 2.11.0 (the newest on PyPI; its metadata pins no torch), whose
# CUDA-linked C++ extension is removed so it imports on CPU torch; f5-tts and vocos use only its pure-Python
# parts. Audio is read and written with soundfile, so FFmpeg/torchcodec are not needed. cached-path goes in
# without its dependencies because it pins rich<14, which would downgrade vastai's rich.
set -euo pipefail
PY=${1:?usage: install_f5tts.sh PYTHON [cpu|cuda]}
KIND=${2:-cpu}
if [ "$KIND" = cuda ]; then TORCH="torch==2.11.0 torchaudio==2.11.0"; else TORCH="torch==2.13.0 torchaudio==2.11.0"; fi
# shellcheck disable=SC2086
"$PY" -m pip install -q $TORCH
"$PY" -m pip install -q --no-deps f5-tts==1.1.22 cached-path==1.8.10
# shellcheck disable=SC2086
"$PY" -m pip install -q $TORCH vocos==0.1.0 accelerate ema-pytorch hydra-core librosa matplotlib pydub \
    pypinyin rjieba safetensors soundfile torchdiffeq tqdm transformers x-transformers wandb datasets \
    google-cloud-storage boto3 rich filelock requests num2words soxr
if [ "$KIND" = cpu ]; then
    rm -f "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"/torchaudio/lib/*.so
fi
"$PY" -c "from f5_tts.api import F5TTS; import vocos, soundfile, soxr, num2words; print('f5-tts ready')"
