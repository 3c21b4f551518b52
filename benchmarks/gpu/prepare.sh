#!/usr/bin/env bash
# Run here, on the CPU machine, before the GPU run (benchmarks/gpu/README.md): downloads the
# wheels the device image lacks into benchmarks/gpu/wheels/ (ignored by git, so it travels
# only when the device call names it in `carry`), checks that every requirement of those wheels
# is in the image or carried, checks that the tree that travels stays under the device tool's
# 64 MiB, and prints the device call to make.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"
PYTHON="${PYTHON:-python3}"
wheels=benchmarks/gpu/wheels
limit=$((64 * 1024 * 1024))

# Exact versions: the device has python 3.12 and none of these. dill and multiprocess are
# datasets' requirements the image lacks; the rest of what these need is in the image
# (checked below against device-image-packages.txt).
pins=(trl==1.16.0 datasets==5.2.0 gguf==0.19.0 bitsandbytes==0.50.2 dill==0.4.1 multiprocess==0.70.19)

git check-ignore -q "$wheels/x.whl" || { echo "$wheels is not ignored by git: it would travel uncarried"; exit 1; }
mkdir -p "$wheels"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$wheels" "${pins[@]}"

# One version of each (two would stop the offline install), every requirement covered.
"$PYTHON" - "$wheels" "$here/device-image-packages.txt" "${pins[@]}" <<'EOF'
import re, sys, zipfile
from pathlib import Path

norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
folder, image_list, pins = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
wanted = {norm(pin.split("==")[0]): pin.split("==")[1] for pin in pins}
image = {norm(line.strip()) for line in image_list.read_text().splitlines() if line.strip() and not line.startswith("#")}
for wheel in sorted(folder.glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    if wanted.get(norm(name)) != version:
        print(f"removing {wheel.name}: not one of the pinned wheels")
        wheel.unlink()
missing = []
for wheel in sorted(folder.glob("*.whl")):
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        for line in archive.read(metadata).decode().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                requirement = norm(re.match(r"[A-Za-z0-9._-]+", line.split(":", 1)[1].strip()).group())
                if requirement not in image and requirement not in wanted:
                    missing.append(f"{wheel.name} needs {requirement}")
found = {norm(w.name.split("-")[0]) for w in folder.glob("*.whl")}
missing += [f"no wheel for {name}" for name in wanted if name not in found]
if missing:
    sys.exit("not covered by the image or the carried wheels:\n  " + "\n  ".join(missing))
print(f"{len(found)} wheels; every requirement is in the device image or carried")
EOF

# What travels: tracked and untracked-not-ignored files (and shared/, where there is one), plus the carry.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
shared=0; [ -d shared ] && shared=$(du -sb shared | cut -f1)
carried=$(du -sb "$wheels" | cut -f1)
total=$((tree + shared + carried))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "travels: project tree $(mib "$tree") + shared/ $(mib "$shared") + wheels $(mib "$carried") = $(mib "$total") (limit 64 MiB)"
[ "$total" -lt "$limit" ] || { echo "over the device tool's 64 MiB: carry less"; exit 1; }

cat <<EOF

The device call (the device tool's \`run\`; check its \`status\` first: can_start_another must be true):
  command:   bash benchmarks/gpu/run.sh
  carry:     ["$wheels"]
  timeout_s: 480
run.sh stops starting stages at DEADLINE_S=420 s and writes \$OUT/gpu.json after every stage,
so a slow stage costs the stages after it, not the results before it. Results come back as
gpu.json and gpu.log; copy gpu.json to benchmarks/results/gpu-h200.json.
A second call, if device time is left, runs the stages gpu.json records as past the deadline, e.g.
  command: STAGES=environment,source,build,heal_lora_student,compare bash benchmarks/gpu/run.sh
EOF
