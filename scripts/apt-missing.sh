# Sourced by the test scripts: apt_missing TAG COMMAND:PACKAGE… installs, in one apt-get run, the Debian
# packages whose command is not on PATH yet, keeping the packages' own services from starting (tests
# start their own servers on free ports). Safe to run again: it skips what is there.
apt_missing() {
  local tag="$1" need=() pair
  shift
  for pair in "$@"; do
    # shellcheck disable=SC2206 # "node:nodejs npm" names two packages
    command -v "${pair%%:*}" >/dev/null || need+=(${pair#*:})
  done
  ((${#need[@]})) || return 0
  echo "$tag: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
}
