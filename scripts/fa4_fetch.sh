#!/usr/bin/env bash
# Here (a machine with network), fetch FlashAttention-4 and its wheels for the device machine, which has none
# (../shared/NOTES.md's recipe), into the two folders that scripts/fa4_peer.sh's two calls carry:
#   .fa4a/cu13.part-aa          the first half of the cu13 libs wheel, unzipped and repacked with xz
#   .fa4b/cu13.part-ab, *.whl   its second half and the other wheels
# The packed cu13 libs (62 MB) and the working tree (4.6 MB) together pass the 64 MiB one call carries, so each
# call carries half of it (fa4_peer.sh joins them). A session's checkout carries main only, so a new session runs
# this again (about 5 minutes, mostly xz).
set -euo pipefail
cd "$(dirname "$0")/.."
for d in .fa4a .fa4b .fa4dl; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
mkdir -p .fa4a .fa4b .fa4dl
platforms=()
for p in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 \
         manylinux2014 manylinux1; do platforms+=(--platform "${p}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  --platform any -d .fa4dl flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 "apache-tvm-ffi<0.2" torch-c-dlpack-ext \
  quack-kernels
find .fa4dl -name '*.whl' ! -name 'nvidia_cutlass_dsl_libs_cu13-*' -exec cp {} .fa4b/ \;
if [ ! -s .fa4dl/cu13.tar.xz ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && unzip -q "$OLDPWD"/.fa4dl/nvidia_cutlass_dsl_libs_cu13-*.whl && tar cf - . | xz -9e -T1 > "$OLDPWD/.fa4dl/cu13.tar.xz")
  rm -rf "$tmp"
fi
rm -f .fa4a/cu13.* .fa4b/cu13.*
half=$(( ($(stat -c %s .fa4dl/cu13.tar.xz) + 1) / 2 ))
head -c "$half" .fa4dl/cu13.tar.xz > .fa4a/cu13.part-aa
tail -c +"$((half + 1))" .fa4dl/cu13.tar.xz > .fa4b/cu13.part-ab
cat .fa4a/cu13.part-aa .fa4b/cu13.part-ab | cmp - .fa4dl/cu13.tar.xz
du -sh .fa4a .fa4b
