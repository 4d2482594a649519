#!/bin/bash
# make install into a staging root: the binary runs from there, and the udev rule, knob script,
# knob defaults and systemd unit land where the rule and the unit say they are.
set -u
Q=${QWEN3D:?}
BUILD=$(dirname "$Q")
fail() { echo "FAIL: $*"; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

make -s -o "$Q" install BUILD="$BUILD" DESTDIR="$tmp" PREFIX=/usr/local >"$tmp/out" 2>&1 || fail "make install: $(cat "$tmp/out")"
"$tmp/usr/local/bin/qwen3d" --help | grep -q "^usage: qwen3d" || fail "the installed qwen3d does not run"
for f in etc/udev/rules.d/60-qwen3mm.rules usr/local/lib/qwen3mm/qwen3mm-knobs etc/qwen3mm.conf \
	etc/systemd/system/qwen3d.service usr/share/doc/qwen3d/README.md; do
	[ -f "$tmp/$f" ] || fail "make install left out /$f"
done
[ -x "$tmp/usr/local/lib/qwen3mm/qwen3mm-knobs" ] || fail "qwen3mm-knobs is not executable"
# the paths the rule and the unit name are the installed ones
grep -q 'RUN+="/usr/local/lib/qwen3mm/qwen3mm-knobs"' "$tmp/etc/udev/rules.d/60-qwen3mm.rules" ||
	fail "the udev rule names another knob script"
grep -q '^ExecStart=/usr/local/bin/qwen3d start' "$tmp/etc/systemd/system/qwen3d.service" ||
	fail "the unit names another qwen3d"
# an edited /etc/qwen3mm.conf survives a second install
echo "queue_depth=64" >"$tmp/etc/qwen3mm.conf"
make -s -o "$Q" install BUILD="$BUILD" DESTDIR="$tmp" >/dev/null 2>&1 || fail "second make install"
grep -qx "queue_depth=64" "$tmp/etc/qwen3mm.conf" || fail "make install overwrote /etc/qwen3mm.conf"
echo "install: ok"
