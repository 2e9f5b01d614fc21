#!/usr/bin/env bash
# Make FlashAttention-4 importable on the device machine, which has no network (../shared/NOTES.md's recipe).
# Its cu13 libs are too large to travel in one call beside the working tree, so it takes two calls on one warm
# machine (a machine idle for 30 s goes back, and with it what the first call left):
#   call 1, carry .fa4a:  bash scripts/fa4_peer.sh stash      (.fa4a/cu13.part-aa -> ~/fa4; e.g. before the tier)
#   call 2, carry .fa4b:  source scripts/fa4_peer.sh install  (joins the halves into ~/cu13, .fa4b/*.whl -> ~/site,
#                         exports PYTHONPATH; scripts/gpu.sh's fa4 phase does this)
# Fetching the wheels (here, with network): bash scripts/fa4_fetch.sh.
case "${1:-}" in
  stash)
    mkdir -p ~/fa4 && cp .fa4a/cu13.part-aa ~/fa4/ && echo "fa4: first half stashed"
    ;;
  install)
    if [ -s ~/fa4/cu13.part-aa ]; then
      mkdir -p ~/cu13 && cat ~/fa4/cu13.part-aa .fa4b/cu13.part-ab | xz -d | tar xf - -C ~/cu13 \
        && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target ~/site \
          .fa4b/*.whl \
        && cp -r ~/cu13/. ~/site/ \
        && export PYTHONPATH=~/site:~/site/nvidia_cutlass_dsl/dsl_packages:${PYTHONPATH:-} \
        && python3 -c "from flash_attn.cute.interface import flash_attn_func" && echo "fa4: importable"
    else
      echo "fa4: ~/fa4/cu13.part-aa missing (the machine went cold between the two calls); running without FA4"
    fi
    ;;
  *) echo "usage: fa4_peer.sh stash|install" >&2 ;;
esac
