#!/usr/bin/env bash
# Runs lintian on the .changes files that packaging/build-deb.sh wrote (each lists the package
# and its -dbgsym, checked together), showing every tag down to info and pedantic, and fails on
# any of them: the packages are kept lintian-clean, and each override in
# packaging/debian/*.lintian-overrides says why.
#
#   packaging/lintian.sh build/deb/iothub_*_amd64.changes
set -euo pipefail

if [ $# = 0 ]; then
	echo "usage: $0 FILE.changes..." >&2
	exit 2
fi
command -v lintian >/dev/null || { echo "lintian is not installed (apt-get install lintian)" >&2; exit 1; }
# Bounded: lintian takes ~10 s a package here.
exec timeout 300 lintian --pedantic --display-info --fail-on error,warning,info,pedantic "$@"
