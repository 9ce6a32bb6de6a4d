#!/usr/bin/env bash
# Chromium for the browser test (tests/test_browser.py); `make test` runs this.
#
#   scripts/browser.sh   # exits 0 whether or not Chromium could be installed
#
# Why Debian's package and not `playwright install`: the machines this project
# runs on (a developer's, CI's) reach the package registries only, so a browser
# build downloaded by Playwright's installer would fail there. Playwright for
# Python (pinned in requirements-dev.txt) drives /usr/bin/chromium instead.
#
# Best effort, like scripts/postgres.sh: if Chromium is missing and we are root
# with apt-get (CI: Debian 12, a fresh clone), the `chromium` package is
# installed; otherwise this says why on stderr and the browser test skips with
# its own message, so `make test` still runs everything else.
set -uo pipefail

CHROMIUM=/usr/bin/chromium
say() { echo "browser.sh: $*" >&2; }

if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    say "$CHROMIUM is missing and cannot be installed here (needs root and apt-get); the browser test will skip"
    exit 0
fi
say "installing the chromium package (apt-get)"
export DEBIAN_FRONTEND=noninteractive
# --no-install-recommends: headless Chromium needs none of the desktop extras.
if ! apt-get install -y -q --no-install-recommends chromium >&2; then
    # A fresh container has no package lists yet.
    if ! { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends chromium >&2; }; then
        say "apt-get install chromium failed; the browser test will skip"
    fi
fi
exit 0
