# Sourced by install.sh, test.sh and demo.sh: choose the Python that dus installs into and runs with.
# An active virtual environment is used as it is. Otherwise, where the system Python refuses
# global installs (PEP 668: an EXTERNALLY-MANAGED marker, as on current Debian and Ubuntu), or
# where there is no `python` command, or when DUS_VENV=1, a project environment .venv is made
# (once) and activated, so `python`, `pip` and `dus` below all mean that environment's.
if [ -z "${VIRTUAL_ENV:-}" ]; then
    _dus_python=$(command -v python3 || command -v python || true)
    if [ -z "$_dus_python" ]; then
        echo "dus: no python3 on PATH; install Python 3.10 or newer first" >&2
        exit 2
    fi
    _dus_stdlib=$("$_dus_python" -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')
    if [ "${DUS_VENV:-}" = 1 ] || [ -f "$_dus_stdlib/EXTERNALLY-MANAGED" ] || ! command -v python >/dev/null 2>&1 || [ -x .venv/bin/python ]; then
        if [ ! -x .venv/bin/python ]; then
            echo "dus: making a project virtual environment in .venv (system Python is externally managed or has no 'python')" >&2
            "$_dus_python" -m venv .venv
        fi
        # shellcheck disable=SC1091
        . .venv/bin/activate
    fi
fi
