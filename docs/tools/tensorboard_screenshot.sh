#!/usr/bin/env bash
# Screenshots of a real TensorBoard server over a real run folder, for docs/monitoring.md.
#
#   docs/tools/tensorboard_screenshot.sh LOGDIR OUTDIR
#   e.g. (after `maskdist demo --workdir /tmp/demo_full`):
#   docs/tools/tensorboard_screenshot.sh /tmp/demo_full/runs docs/images
#
# Writes OUTDIR/tensorboard-scalars.png (train/loss and val/macro_f1 of every fold) and
# OUTDIR/tensorboard-images.png (augmented batch and last-epoch confusion matrix of folds 0 and 1),
# each a crop of the page at 1.5x device scale, reduced to 256 colours.
#
# Needs: Debian's chromium (`apt-get install -y chromium`; run as root it needs --no-sandbox,
# which is passed), and a Python with tensorboard and Pillow (maskdist's environment has both).
# Environment: PYTHON (default python3), TENSORBOARD (default tensorboard), CHROMIUM (default chromium).
# Nothing is fetched from the network: TensorBoard listens on 127.0.0.1 only.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 LOGDIR OUTDIR" >&2
    exit 2
fi
LOGDIR=$1
OUTDIR=$2
PYTHON=${PYTHON:-python3}
TENSORBOARD=${TENSORBOARD:-tensorboard}
CHROMIUM=${CHROMIUM:-chromium}
[ -d "$LOGDIR" ] || { echo "no such folder: $LOGDIR" >&2; exit 1; }
command -v "$CHROMIUM" >/dev/null || { echo "$CHROMIUM not found: apt-get install -y chromium" >&2; exit 1; }
mkdir -p "$OUTDIR"

WORK=$(mktemp -d)
TB_PID=""
SEED_PID=""
cleanup() {
    for pid in $SEED_PID $TB_PID; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE="http://127.0.0.1:$PORT"

browse() {  # browse OUT.png URL [extra chromium flags...]: one headless page load, then a screenshot
    local out=$1 url=$2
    shift 2
    timeout 180 "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$WORK/profile" --window-size=1400,1000 --virtual-time-budget=15000 \
        "$@" --screenshot="$out" "$url" >"$WORK/chromium.log" 2>&1 \
        || { tail -20 "$WORK/chromium.log" >&2; exit 1; }
}

# 1. The legacy scalars page keeps "ignore outliers in chart scaling" (on by default, which
#    clips the best fold's curve) in the browser's localStorage, not in the URL. Set it to off
#    for this origin with a throwaway page served on the same port, before TensorBoard takes it.
cat >"$WORK/seed.py" <<'PY'
import http.server, sys
PAGE = b'<html><head><title>seed</title><script>localStorage.setItem("_ignoreYOutliers", "false")</script></head></html>'
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
PY
"$PYTHON" "$WORK/seed.py" "$PORT" &
SEED_PID=$!
"$PYTHON" - "$BASE/seed" <<'PY'
import sys, time, urllib.request
for _ in range(100):
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2).read()
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("the seed page did not answer")
PY
timeout 60 "$CHROMIUM" --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$WORK/profile" --virtual-time-budget=2000 \
    --dump-dom "$BASE/seed" >/dev/null 2>"$WORK/chromium.log"
kill "$SEED_PID"
wait "$SEED_PID" 2>/dev/null || true
SEED_PID=""

# 2. TensorBoard on the same port; wait until it has read the scalars and images of the run.
"$TENSORBOARD" --logdir "$LOGDIR" --host 127.0.0.1 --port "$PORT" >"$WORK/tensorboard.log" 2>&1 &
TB_PID=$!
"$PYTHON" - "$BASE" "$TB_PID" <<'PY' || { tail -20 "$WORK/tensorboard.log" >&2; exit 1; }
import json, os, sys, time, urllib.request
base, pid = sys.argv[1], int(sys.argv[2])
def get(path):
    return json.loads(urllib.request.urlopen(base + path, timeout=5).read())
for _ in range(240):
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("tensorboard exited")
    try:
        scalars, images = get("/data/plugin/scalars/tags"), get("/data/plugin/images/tags")
        if (any("val/macro_f1" in tags for tags in scalars.values())
                and any("val/confusion" in tags for tags in images.values())):
            print("tensorboard runs:", ", ".join(sorted(get("/data/runs"))))
            break
    except (OSError, ValueError):
        pass
    time.sleep(0.5)
else:
    sys.exit("tensorboard did not show val/macro_f1 and val/confusion within 2 minutes")
PY

# 3. The pages. Runs are filtered to the fold folders (accelerate also writes an hparams-only
#    run per fold, fold<K>/tb/<timestamp>); smoothing 0 shows the logged values as they are.
FOLDS='%28%5E%7C%2F%29fold%5B0-9%5D%2B%2Ftb%24'   # (^|/)fold[0-9]+/tb$
FOLDS01='%28%5E%7C%2F%29fold%5B01%5D%2Ftb%24'     # (^|/)fold[01]/tb$
browse "$WORK/scalars.png" "$BASE/#scalars&tagFilter=%5E%28train%2Floss%7Cval%2Fmacro_f1%29%24&regexInput=$FOLDS&_smoothingWeight=0" \
    --force-device-scale-factor=1.5
browse "$WORK/images.png" "$BASE/#images&tagFilter=%5E%28val%2Fconfusion%7Ctrain%2Faugmented_batch%29%24&regexInput=$FOLDS01" \
    --force-device-scale-factor=1.5

# 4. Crop, reduce to a 256-colour palette, and refuse a page whose charts were not drawn
#    (plot lines, faces and matrix cells are the only saturated colours in the chart area).
"$PYTHON" - "$WORK" "$OUTDIR" <<'PY'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

work, out = Path(sys.argv[1]), Path(sys.argv[2])
scale = 1.5  # --force-device-scale-factor
# (left, top, right, bottom) in CSS pixels of the 1400x1000 window: what to keep, where the charts are
crops = {
    "scalars": ((0, 0, 1075, 615), (380, 210, 1060, 400)),
    "images": ((350, 160, 1100, 940), (370, 260, 1090, 920)),
}
for name, (keep, charts) in crops.items():
    page = Image.open(work / f"{name}.png").convert("RGB")
    hsv = np.asarray(page.crop(tuple(int(v * scale) for v in charts)).convert("HSV"))
    drawn = float(((hsv[..., 1] > 100) & (hsv[..., 2] > 80)).mean())
    if drawn < 0.005:
        sys.exit(f"{name}: nothing drawn in the chart area: TensorBoard did not finish rendering (see {work})")
    picture = page.crop(tuple(int(v * scale) for v in keep))
    picture = picture.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    target = out / f"tensorboard-{name}.png"
    picture.save(target, optimize=True)
    print(f"{target}: {picture.width}x{picture.height}, {target.stat().st_size // 1024} KiB ({drawn:.1%} of the chart area in colour)")
PY
