# Sourced by scripts/demo, check, test, install-test-deps and fuzz: the project's own virtual
# environment in .venv, so that nothing is installed into the system interpreter's
# site-packages (Debian 12/13 and Ubuntu 24.04 refuse that: PEP 668, externally-managed-environment).
#
#   use_venv EXTRAS     # e.g. use_venv 'test,fast': create .venv if needed, install mailgate
#                       # editable with those extras if pyproject.toml or EXTRAS changed, and
#                       # put .venv/bin first on PATH
#
# Whatever python3 comes first on PATH makes the environment (3.11 or newer). On Debian, the
# venv module needs the python3-venv package: it is installed (as root, or with sudo) when missing.

_venv_python() {
  command -v python3 >/dev/null || { echo "$0: python3 not found (apt-get install python3)" >&2; exit 1; }
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "$0: mailgate needs Python 3.11 or newer; $(command -v python3) is $(python3 -V 2>&1)" >&2; exit 1; }
}

_venv_create() {
  rm -rf .venv
  if python3 -m venv .venv 2>/dev/null; then return; fi
  rm -rf .venv
  # Debian's python3 ships venv without ensurepip: that is the python3-venv package.
  echo "$0: installing Debian's python3-venv (python3 -m venv needs it)" >&2
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-venv
  python3 -m venv .venv
}

use_venv() {
  local extras="$1" stamp="" have="" sum extra
  if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    _venv_python
    _venv_create
  fi
  # Re-install only when the dependencies may have changed: the install is editable, so edits
  # to src/ need none.
  # .venv/.mailgate-installed: "<cksum of pyproject.toml> <extras installed>".
  sum="$(cksum < pyproject.toml | tr ' ' '-')"
  read -r stamp have 2>/dev/null < .venv/.mailgate-installed || true
  [ "${stamp:-}" = "$sum" ] || have=""
  for extra in ${extras//,/ }; do
    case ",${have:-}," in *",$extra,"*) ;; *) have="";; esac
  done
  if [ -z "${have:-}" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
    echo "$sum $extras" > .venv/.mailgate-installed
  fi
  export VIRTUAL_ENV="$PWD/.venv"
  export PATH="$VIRTUAL_ENV/bin:$PATH"
}
