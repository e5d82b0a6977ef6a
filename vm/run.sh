#!/usr/bin/env bash
# Run a command inside a 2-NUMA-node qemu guest that boots Debian's packaged
# kernel on the host's own root (shared read-only over 9p), so the guest sees
# this work tree, its .venv and the kernel headers at the same paths.
#
#   vm/run.sh                     # .venv/bin/pytest tests/vm, from the repo root
#   vm/run.sh CMD [ARG...]        # any command, run from the repo root
#
# Exit status: the command's own (through qemu's isa-debug-exit device);
# 124 when the guest timed out, 125 when the guest could not run it.
# Environment: VM_NODES (the NUMA layout, CPU lists per node, default
# "0-1;2-3"; 1 GiB of memory per node; an empty list is a node with memory
# only), VM_SMP (extra -smp properties, e.g. "sockets=2,cores=2" for one
# last-level cache per socket), VM_TIMEOUT (s, default 900), VM_ACCEL
# (tcg | kvm, default tcg: the nested /dev/kvm of this machine kind cannot
# boot Debian's kernel), VM_KERNEL (a release such as 6.1.0-56-amd64; default:
# what the installed linux-image-amd64 depends on), VM_VERBOSE=1 (the
# kernel's boot log too). NUMAREUSE_*, CI and PYTEST_ADDOPTS pass into the
# guest, and NUMAREUSE_VM_NODES tells it the layout it was booted with.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=$repo/.build/vm
timeout_s=${VM_TIMEOUT:-900}
nodes=${VM_NODES:-0-1;2-3}
accel=${VM_ACCEL:-tcg}
smp=${VM_SMP:-}
start=${EPOCHREALTIME/./}

elapsed() { # seconds since start, one decimal
	local t=$(((${EPOCHREALTIME/./} - start) / 100000))
	printf '%3d.%d' $((t / 10)) $((t % 10))
}
say() { echo "vm [$(elapsed)s]: $*"; }
die() {
	echo "vm: error: $*" >&2
	exit 125
}

# -- which kernel: the one Debian's metapackage points at, never a hard-coded ABI
kernel_release() {
	local dep
	dep=$(dpkg-query -W -f='${Status} ${Depends}' linux-image-amd64 2>/dev/null | grep '^install ok installed') ||
		dep=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: //p')
	dep=$(grep -o 'linux-image-[0-9][^ ,]*' <<<"$dep" | head -n1)
	[ -n "$dep" ] || die "cannot tell which kernel linux-image-amd64 installs (make setup installs it)"
	echo "${dep#linux-image-}"
}
release=${VM_KERNEL:-$(kernel_release)}
vmlinuz=/boot/vmlinuz-$release
moddir=/lib/modules/$release
[ -r "$vmlinuz" ] || die "$vmlinuz missing: apt-get install linux-image-$release"
[ -f "$moddir/modules.dep" ] || die "$moddir/modules.dep missing: apt-get install linux-image-$release"
# bcc compiles inside the guest against /lib/modules/<guest release>/build
[ -e "$moddir/build/include" ] ||
	echo "vm: warning: no headers at $moddir/build (linux-headers-$release): bcc cannot compile in the guest" >&2
# the guest learns the work tree from the kernel command line, split at spaces
[[ $repo != *[[:space:]]* ]] || die "the work tree's path has a space: $repo"
mkdir -p "$cache"
build=$(mktemp -d "$cache/run.XXXXXX") # this run's initramfs and status: runs may overlap
trap 'rm -rf "$build"' EXIT
# a TERM or HUP to this script (a cancelled CI job, a killed make) must stop qemu
# too, or it keeps 2 GiB and a CPU until VM_TIMEOUT
qemu_pid=
trap '[ -z "$qemu_pid" ] || kill -TERM "$qemu_pid" 2>/dev/null; exit 143' TERM HUP

# -- the uncompressed kernel: TCG decompresses a bzImage ~3 s slower than it
# boots the ELF vmlinux inside it (qemu starts it through its PVH entry note)
vmlinux=$cache/vmlinux-$release
if [ ! -s "$vmlinux" ] || [ "$vmlinuz" -nt "$vmlinux" ]; then
	kernel=$vmlinuz
	for fmt in '\xfd7zXZ\x00:xz' '\x28\xb5\x2f\xfd:zstd' '\x1f\x8b\x08:gzip'; do
		magic=${fmt%:*} tool=${fmt##*:}
		off=$(LC_ALL=C grep -obUaP -m1 "$magic" "$vmlinuz" | head -n1 | cut -d: -f1) || true
		[ -n "$off" ] || continue
		# the payload is followed by other data: the decompressor's complaint about it is expected
		tail -c +$((off + 1)) "$vmlinuz" | "$tool" -dc >"$build/vmlinux" 2>/dev/null || true
		if [ "$(head -c4 "$build/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then
			mv "$build/vmlinux" "$vmlinux"
			break
		fi
	done
fi
if [ -s "$vmlinux" ]; then
	kernel=$vmlinux
	say "kernel $release (uncompressed from $vmlinuz)"
else
	kernel=$vmlinuz
	say "kernel $release (compressed: $vmlinuz; no ELF payload found)"
fi

# -- the initramfs: busybox, the modules for 9p over virtio and overlayfs, vm/init
# the initramfs has no C library: only the statically linked busybox runs there
busybox=/bin/busybox
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' && [ -x "$busybox" ] ||
	die "no static busybox: apt-get install busybox-static"
initrd=$build/initramfs.cpio
root=$build/initramfs
rm -rf "$root"
mkdir -p "$root"/{bin,dev,proc,sys,newroot,modules}
cp "$busybox" "$root/bin/busybox"
cp "$repo/vm/init" "$root/init"
declare -A seen=()
load=()
add_module() { # $1: path relative to $moddir as modules.dep names it; dependencies first
	local m=$1 dep
	[ -z "${seen[$m]:-}" ] || return 0
	seen[$m]=1
	for dep in $(awk -v m="$m:" '$1 == m { $1 = ""; print }' "$moddir/modules.dep"); do
		add_module "$dep"
	done
	local name
	name=$(basename "$m")
	name=${name%%.ko*}.ko
	case $m in
	*.ko.xz) xz -dc "$moddir/$m" >"$root/modules/$name" ;;
	*.ko.zst) zstd -qdc "$moddir/$m" >"$root/modules/$name" ;;
	*.ko.gz) gzip -dc "$moddir/$m" >"$root/modules/$name" ;;
	*) cp "$moddir/$m" "$root/modules/$name" ;;
	esac
	load+=("$name")
}
for mod in virtio_pci 9pnet_virtio 9p overlay; do
	path=$(grep -oE "^[^:]*/$mod\.ko(\.[a-z]+)?:" "$moddir/modules.dep" | head -n1 | tr -d :) || true
	if [ -n "$path" ]; then
		add_module "$path"
	elif ! grep -qE "/$mod\.ko" "$moddir/modules.builtin"; then
		die "kernel $release has no module $mod"
	fi
done
printf '%s\n' "${load[@]}" >"$root/modules.load"
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) >"$initrd"
say "initramfs $(du -k "$initrd" | cut -f1) KiB: busybox, vm/init, modules: ${load[*]%.ko}"

# -- the NUMA layout: one memory backend and one -numa node per VM_NODES entry
# An empty entry is a node with memory and no CPUs (as CXL memory): "0-1;;2-3", "0-1;2-3;".
numa=() ncpus=0 node=0
IFS=';' read -ra node_cpus <<<"$nodes;" # the extra ';' keeps a trailing empty entry
for cpus in "${node_cpus[@]}"; do
	[[ $cpus =~ ^([0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*)?$ ]] || die "VM_NODES=$nodes: expected CPU lists such as 0-1;2-3"
	numa+=(-object "memory-backend-ram,id=m$node,size=1G" -numa "node,nodeid=$node${cpus:+,cpus=${cpus//,/,cpus=}},memdev=m$node")
	for c in ${cpus//[,-]/ }; do ((c < ncpus)) || ncpus=$((c + 1)); done
	node=$((node + 1))
done
((ncpus > 0)) || die "VM_NODES=$nodes: no node has CPUs"

# -- the command and the environment it gets, as a shell script on the kernel command line
if [ $# -eq 0 ]; then
	set -- .venv/bin/pytest tests/vm
fi
script="export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8"
# the guest's console is a terminal: colours only when ours is one too
term=dumb
[ -t 1 ] && term=${TERM:-dumb}
script+=$'\n'"export NUMAREUSE_IN_VM=1 NUMAREUSE_VM_NODES=$(printf %q "$nodes") TERM=$term"
while IFS= read -r var; do
	script+=$'\n'"export $(printf '%s=%q' "$var" "${!var}")"
done < <(compgen -e | grep -E '^(NUMAREUSE_[A-Z_]+|CI|PYTEST_ADDOPTS)$' | grep -vxE 'NUMAREUSE_(IN_VM|VM_NODES)' || true)
script+=$'\n'"cd $(printf '%q' "$repo") || exit 125"
cmd=$(printf '%q ' "$@")
script+=$'\n'"echo $(printf %q "vm-guest: running: $cmd")"
script+=$'\n'"$cmd"
cmdline="console=ttyS0 panic=-1 numareuse.workdir=$repo numareuse.run=$(base64 -w0 <<<"$script")"
[ "${VM_VERBOSE:-0}" = 1 ] || cmdline="quiet $cmdline"
[ ${#cmdline} -lt 2000 ] || die "command line too long for the kernel (${#cmdline} bytes)"

# -- the machine
case $accel in
tcg) accel_opts=(-accel tcg,thread=multi -cpu max) ;;
kvm) accel_opts=(-accel kvm -cpu host) ;;
*) die "VM_ACCEL=$accel: use tcg or kvm" ;;
esac
qemu=(
	qemu-system-x86_64 -nodefaults -no-user-config -nographic -no-reboot
	-machine pc "${accel_opts[@]}" -smp "$ncpus${smp:+,$smp}" -m "${node}G" "${numa[@]}"
	-kernel "$kernel" -initrd "$initrd" -append "$cmdline"
	-fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap
	-device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot
	-device isa-debug-exit,iobase=0xf4,iosize=0x04
	-serial stdio
	# SeaBIOS: no banner and no terminal escape codes on the serial line
	-fw_cfg name=etc/sercon-port,string=0
)
command -v qemu-system-x86_64 >/dev/null || die "qemu missing: apt-get install qemu-system-x86"
say "booting: qemu $accel, $ncpus vCPUs, $node NUMA nodes (CPUs by node: $nodes), timeout ${timeout_s}s"

# Guest lines pass through as they come; its stage lines get the host's clock,
# and the status it reports is kept to tell its exit from qemu's own errors.
status_file=$build/status
rm -f "$status_file"
set +e
# --foreground: a ^C reaches qemu, which then stops
exec 3< <(exec timeout --foreground -k 10 "$timeout_s" "${qemu[@]}" </dev/null 2>&1)
qemu_pid=$! # timeout's pid: it passes a TERM on to qemu
while IFS= read -r line <&3; do
	line=${line%$'\r'}
	case $line in
	vm-guest:*)
		echo "vm [$(elapsed)s] ${line#vm-}"
		case $line in "vm-guest: exit status "*) echo "${line##* }" >"$status_file" ;; esac
		;;
	*"name=etc/sercon-port"*) ;; # qemu's warning about the option that keeps SeaBIOS off the serial line
	*) printf '%s\n' "$line" ;;
	esac
done
wait "$qemu_pid"
rc=$?
qemu_pid=
exec 3<&-
set -e
reported=$(cat "$status_file" 2>/dev/null || true)
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
	say "timed out after ${timeout_s}s (VM_TIMEOUT)"
	exit 124
fi
if [ -z "$reported" ] || [ $((rc & 1)) = 0 ] || [ $(((rc - 1) / 2)) != "$reported" ]; then
	say "qemu exited $rc without a status from the guest"
	exit 125
fi
say "done: guest command exit status $reported"
exit "$reported"
