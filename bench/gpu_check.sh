#!/usr/bin/env bash
# One prepared check of the media handlers on a GPU machine (H100/H200, PyTorch present, no network):
# the media tests on CUDA, then the 1080p benchmark. Logs go to $OUT (or /tmp/spool-gpu-check).
#   bash bench/gpu_wheels.sh           # first, on a machine with PyPI: PyAV, pydantic... into .whl/
#   bash bench/gpu_check.sh            # then there, from the repository root, with .whl/ brought along
# Without the ffmpeg command there, the benchmark's baseline is FFmpeg's own libraries through PyAV.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS="${OUT:-/tmp/spool-gpu-check}"
PY="${PYTHON:-python3}"
mkdir -p "$LOGS"

if compgen -G ".whl/*.whl" >/dev/null; then  # PyAV, pydantic-settings...: see bench/gpu_wheels.sh
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl 2>&1 | tail -3
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export SPOOL_DEVICE=cuda PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" - <<'PY'
import os, torch, av, PIL, numpy
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name(0)}; "
      f"PyAV {av.__version__}, Pillow {PIL.__version__}, numpy {numpy.__version__}; {os.cpu_count()} CPUs")
PY
  command -v ffmpeg >/dev/null && ffmpeg -hide_banner -version | head -1 || echo "ffmpeg: not on this machine"
} 2>&1 | tee "$LOGS/env.log"

status=0
echo "== pytest tests/test_media_handlers.py (SPOOL_DEVICE=cuda)"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider --noconftest tests/test_media_handlers.py 2>&1 \
  | tee "$LOGS/pytest.log" || status=1

echo "== bench/media.py --size 1080 --device cuda"
timeout 360 "$PY" bench/media.py --size 1080 --device cuda 2>&1 | tee "$LOGS/bench.log" || status=1

echo "Earlier reference (README performance section: the ffmpeg 4.2 command on an H100 machine's 16 cores, 1080p -> 2160p):" \
  "lanczos no encode 97 frames/s; decode + lanczos 2x + libx264 veryfast 44 frames/s" | tee -a "$LOGS/bench.log"
echo "== done (status $status); logs in $LOGS"
exit $status
