#!/usr/bin/env bash
# Everything this project and its tests need, into the active Python environment; safe to run again.
#
#     python3 -m venv .venv && . .venv/bin/activate && bash setup.sh
#
# A GPU user installs the CUDA build of torch first (https://pytorch.org); a torch already there is kept.
# .ci/run calls this too, so CI is set up the way the README sets a user up.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' && [ -z "${CONDA_PREFIX:-}" ]; then
    echo "setup: note: no virtual environment is active; if pip refuses, first:" \
         "python3 -m venv .venv && . .venv/bin/activate"
fi

if "$PYTHON" -c 'import torch' 2>/dev/null; then
    echo "setup: keeping the installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
else
    "$PYTHON" -m pip install -q torch==2.13.0  # the CPU wheel; a plain `torch` would pull a multi-GB CUDA build
fi
"$PYTHON" -m pip install -q -r requirements.txt
"$PYTHON" -m pip install -q -e .
# The application examples' libraries, with the installed torch pinned: none of them may swap it for another build.
TORCH_PIN=$(mktemp)
trap 'rm -f "$TORCH_PIN"' EXIT
echo "torch==$("$PYTHON" -c 'import torch; print(torch.__version__)')" > "$TORCH_PIN"
"$PYTHON" -m pip install -q -r APP_example/requirements.txt -c "$TORCH_PIN"

# The web UI's browser test drives a headless chromium: Debian's, or one Playwright downloaded itself.
playwright_chromium() {
    "$PYTHON" - <<'EOF' 2>/dev/null
from pathlib import Path
from playwright.sync_api import sync_playwright
with sync_playwright() as pw:
    path = Path(pw.chromium.executable_path)
print(path if path.is_file() else "")
EOF
}
if [ -x /usr/bin/chromium ] || [ -n "$(playwright_chromium)" ]; then
    :
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian's chromium for the web UI's browser test"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
        echo "setup: apt-get could not install chromium; the browser test needs it (or: $PYTHON -m playwright install" \
             "chromium)"
    fi
else
    echo "setup: no browser for the web UI's browser test (it will be skipped): sudo apt-get install chromium" \
         "(Debian), or: $PYTHON -m playwright install chromium"
fi
