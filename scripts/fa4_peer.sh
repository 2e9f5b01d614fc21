#!/usr/bin/env bash
# Make FlashAttention-4 importable on the device machine, which has no network (../shared/NOTES.md's recipe).
# The cu13 libs wheel is too large to travel with the others, so it takes two calls on one warm machine:
#   call 1, carry .fa4a:  bash scripts/fa4_peer.sh unpack   (.fa4a/cu13.tar.xz -> ~/cu13)
#   call 2, carry .fa4b:  source scripts/fa4_peer.sh install (.fa4b/*.whl -> ~/site, exports PYTHONPATH)
# Fetching the wheels (here, with network): bash scripts/fa4_fetch.sh (../shared/NOTES.md has the recipe).
case "${1:-}" in
  unpack)
    mkdir -p ~/cu13 && tar xJf .fa4a/cu13.tar.xz -C ~/cu13 && echo "fa4: cu13 libs unpacked"
    ;;
  install)
    if [ -d ~/cu13 ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target ~/site .fa4b/*.whl \
        && cp -r ~/cu13/. ~/site/ \
        && export PYTHONPATH=~/site:~/site/nvidia_cutlass_dsl/dsl_packages:${PYTHONPATH:-} \
        && python3 -c "from flash_attn.cute.interface import flash_attn_func" && echo "fa4: importable"
    else
      echo "fa4: ~/cu13 missing (the machine went cold between the two calls); running without FA4"
    fi
    ;;
  *) echo "usage: fa4_peer.sh unpack|install" >&2 ;;
esac
