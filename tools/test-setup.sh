# Sourced by tools/test.sh (the README's test command) and .ci/run: installs
# and starts everything the tests need on a fresh Debian machine (as root or
# with sudo, the package registries reachable) and exports what the tests read
# (MOTIF_TEST_DATABASE_URL, MOTIF_TEST_MOTO, MOTIF_SCHEMATHESIS).
# Nothing is skipped: a test whose part is missing fails and says what.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

# mesa-vulkan-drivers: the software Vulkan driver the tests run on; ffmpeg: ffprobe
# and ffmpeg check the MP4s Motif writes; xvfb: the X server the viewer's tests open
# their window on; weston: the headless Wayland compositor of the viewer's Wayland test;
# postgresql: the shared queue of `motif serve --database` / `motif worker`;
# chromium, chromium-driver: the headless browser (through WebDriver) of the gallery's
# browser test; python3 (only where none is on PATH): schemathesis and moto below.
packages=(mesa-vulkan-drivers libvulkan1 ffmpeg xvfb weston postgresql postgresql-client
          chromium chromium-driver)
command -v python3 >/dev/null || packages+=(python3 python3-pip)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi

# schemathesis 4 (its CLI flags): the property-based checker run against the served
# OpenAPI document (tests/serve.rs); moto 5's S3 server: the S3-compatible bucket the
# `--store s3://` tests write to. A Debian-managed python3 refuses plain pip installs.
pip_install() {
    python3 -m pip install --quiet "$@" 2>/dev/null \
        || python3 -m pip install --quiet --break-system-packages "$@"
}
python3 -c 'import schemathesis' 2>/dev/null || pip_install "schemathesis>=4,<5"
python3 -c 'import moto.server' 2>/dev/null || pip_install "moto[server]>=5,<6"
# Their scripts, wherever this python puts scripts (a pyenv shim may not exist yet).
scripts="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
export MOTIF_SCHEMATHESIS="$scripts/st"
export MOTIF_TEST_MOTO="$scripts/moto_server"

# Start Debian's PostgreSQL cluster (no init system needed) and give the tests a
# role that may create their own databases.
as_postgres() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }
pg_version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
if ! pg_lsclusters -h | grep -q "^$pg_version main"; then
    $SUDO pg_createcluster "$pg_version" main
fi
$SUDO pg_ctlcluster "$pg_version" main start 2>/dev/null || true
for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 && break; sleep 1; done
as_postgres psql -q -c "DO \$\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'motif') THEN CREATE ROLE motif LOGIN PASSWORD 'motif' CREATEDB; END IF; END \$\$;"
if [ "$(as_postgres psql -tAc "SELECT 1 FROM pg_database WHERE datname = 'motif_test'")" != "1" ]; then
    as_postgres createdb -O motif motif_test
fi
export MOTIF_TEST_DATABASE_URL="postgres://motif:motif@127.0.0.1:5432/motif_test"

# lavapipe's window-system code warns without a runtime dir; compute does not need one.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

