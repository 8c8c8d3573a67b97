#!/bin/sh
# The GPU measurements issue #4 still lacks, for a session lent a GPU machine through the device tool. A session has
# 15 minutes of device time in all, the machine's start included, and one command may run 10, so the whole set is one
# call. Here, first:
#   sh bench/gpu_wheels.sh
# then one device call with carry [".whl"] and timeout_s 600:
#   sh bench/gpu_session.sh all        # everything below, most needed first, inside ORCH_GPU_SECONDS (default 540)
# or one stage per call:
#   sh bench/gpu_session.sh tests      # tests/engine/test_gpu.py, bench/overhead.py and bench/stop_vote.py on the GPU,
#                                      # then bench/evaluate.py on the host's cores
#   sh bench/gpu_session.sh clip       # bench/clip_throughput.py: ViT-B/16 and ViT-B/32, orch vs open_clip
#   sh bench/gpu_session.sh gradcache  # 65,536 image-text pairs, CLIP ViT-B/32 towers, tiled InfoNCE
# Logs and JSON go to $OUT (the device tool brings back 8 files at most); figures go to bench/RESULTS.md by hand.
set -eu
out=${OUT:-/tmp/orch-gpu}
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1

tests() {
    python3 -m pytest -q -p no:cacheprovider -rA tests/engine/test_gpu.py
}
overhead() {
    python3 bench/overhead.py --devices cuda --rounds 10 --json "$out/overhead.json"
}
stop_vote() {
    python3 bench/stop_vote.py --device cuda --rounds 10 --json "$out/stop_vote.json"
}
clip() {  # $1: ViT-B-16 or ViT-B-32; $2: rounds
    python3 bench/clip_throughput.py --models "$1" --rounds "$2" \
        --variants orch,orch-compile,orch-zero2-overlap,open_clip --json "$out/clip_${1#ViT-}.json"
}
evaluate() {  # the host's cores, not the GPU: evaluation decoding with loader workers on 16 cores
    python3 bench/evaluate.py --workers 0,2,4,8 --rounds 2 --json "$out/evaluate.json"
}
gradcache() {
    python3 bench/gradcache.py --batch-size 65536 --chunks 512 --skip-off --steps 1 --warmup 1 \
        --loss infonce:tile=4096 --distinct-images 4096 \
        --encoder vit:image_size=224,patch_size=32,width=768,depth=12,heads=12,embed_dim=512,pool=cls,in_channels=3 \
        --text-encoder text-transformer:width=512,depth=12,heads=8,context_length=77,embed_dim=512,pool=eot \
        --json "$out/gradcache65536.json"
}

# `sh bench/gpu_session.sh _run FUNCTION ARGS`: what `within` runs under timeout, which runs commands, not functions
if [ "${1:-}" = _run ]; then
    shift
    "$@"
    exit
fi

began=$(date +%s)
mkdir -p "$out"
if ! python3 -c "import deepspeed" 2>/dev/null; then  # a fresh machine, where nothing can be fetched
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
if ! python3 -c "import importlib.metadata as m; m.distribution('orch')" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .  # orch's entry points
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

# within: run "$@" for at most $1 seconds and no longer than the session's deadline, appending to session.log
within() {
    limit=$1
    shift
    left=$((began + ${ORCH_GPU_SECONDS:-540} - $(date +%s)))
    if [ "$left" -lt 60 ]; then
        echo "== $*: skipped, ${left} s left" | tee -a "$out/session.log"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $* (at most ${limit} s)" | tee -a "$out/session.log"
    start=$(date +%s)
    status=0
    timeout "$limit" sh "$0" _run "$@" >>"$out/session.log" 2>&1 || status=$?
    echo "== $*: exit ${status} after $(($(date +%s) - start)) s" | tee -a "$out/session.log"
}

case "${1:-}" in
    all)
        within 150 tests
        within 120 overhead
        within 300 clip ViT-B-16 4
        within 240 gradcache
        within 60 stop_vote
        within 240 clip ViT-B-32 4
        within 90 evaluate
        ;;
    tests)
        within 600 tests
        within 600 overhead
        within 600 stop_vote
        within 600 evaluate
        ;;
    clip)
        within 600 clip ViT-B-16 6
        within 600 clip ViT-B-32 6
        ;;
    gradcache)
        within 600 gradcache
        ;;
    *)
        echo "usage: sh bench/gpu_session.sh all|tests|clip|gradcache" >&2
        exit 2
        ;;
esac
