#!/usr/bin/env bash
# One command: set up kind (unless E2E_SKIP_SETUP=1 and KUBECONFIG points at a prepared cluster) and run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ "${E2E_SKIP_SETUP:-0}" == 1 ]] || e2e/setup.sh
exec .venv/bin/pytest e2e -q -p no:cacheprovider "$@"
