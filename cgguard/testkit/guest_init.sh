#!/bin/busybox sh
# PID 1 of the cgguard test guest (packed into the initramfs by vm.py, run by static busybox).
#
# It makes the host's root, shared read-only over 9p, the root of the job, with fresh proc, sys,
# dev, tmpfs scratch dirs and a pure cgroup2 hierarchy whose root hands every controller down
# (as systemd does on a pure-v2 host). It then runs the one job that the host left in the
# writable "results" share (job.sh), stores its stdout, stderr and exit code there and powers
# off. A failing step prints "cgguard-guest: FATAL ..." and powers off without an exit code, which
# the host reports as "no-result" with this console's tail.

/bin/busybox --install -s /bin
export PATH=/bin

ROOT=/mnt                    # the host's / (read-only)
R=$ROOT/run/guest-results    # the results share, mounted inside the new root
NINEP=trans=virtio,version=9p2000.L,msize=512000

say() { echo "cgguard-guest: $*"; }
die() { say "FATAL: $*"; sync; poweroff -f; sleep 10; exit 1; }

mount -t proc proc /proc || die "mount /proc"
mount -t sysfs sysfs /sys || die "mount /sys"
mount -t devtmpfs devtmpfs /dev || die "mount /dev"

# virtio-pci and 9p are modules in Debian's generic kernel; modules.load lists them deps first.
while read -r mod; do
    insmod "/lib/modules/$mod.ko" || die "insmod $mod"
done < /modules.load

# cache=loose: the host tree does not change under a test run, and caching makes Python's
# imports over 9p several times faster.
mount -t 9p -o "$NINEP,ro,cache=loose" hostroot $ROOT || die "mount the host root over 9p"

mount -t proc proc $ROOT/proc || die "mount proc"
mount -t sysfs sysfs $ROOT/sys || die "mount sysfs"
mount -t devtmpfs devtmpfs $ROOT/dev || die "mount devtmpfs"
mkdir -p $ROOT/dev/pts $ROOT/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $ROOT/dev/pts || die "mount devpts"
# /dev/shm is needed by Python's multiprocessing (POSIX semaphores).
mount -t tmpfs -o mode=1777 tmpfs $ROOT/dev/shm || die "mount /dev/shm"
mount -t tmpfs -o mode=0755 tmpfs $ROOT/run || die "mount /run"
mount -t tmpfs -o mode=1777 tmpfs $ROOT/tmp || die "mount /tmp"
mount -t tmpfs -o mode=1777 tmpfs $ROOT/var/tmp || die "mount /var/tmp"

CG=$ROOT/sys/fs/cgroup
mount -t cgroup2 -o nsdelegate cgroup2 $CG || die "mount cgroup2"
# One controller at a time: a write naming several fails as a whole if one is refused.
for c in $(cat $CG/cgroup.controllers); do
    echo "+$c" > $CG/cgroup.subtree_control || say "warning: cannot enable the $c controller"
done
# The job runs in a leaf like a service on a systemd host, not in the root cgroup.
mkdir $CG/job.scope || die "mkdir job.scope"

mkdir -p $R
mount -t 9p -o "$NINEP" results $R || die "mount the results share"
[ -f $R/job.sh ] || die "the host left no job.sh in the results share"
# Host paths the job needs that the tmpfs mounts above hide (a checkout or venv under /tmp)
# come as extra read-only shares: "tag path" lines.
if [ -f $R/binds ]; then
    while read -r tag path; do
        mkdir -p "$ROOT$path" && mount -t 9p -o "$NINEP,ro,cache=loose" "$tag" "$ROOT$path" \
            || die "mount $path"
    done < $R/binds
fi

hostname cgguard-guest
ip link set lo up || say "warning: cannot bring up lo"

export CGGUARD_IN_GUEST=1 PYTHONDONTWRITEBYTECODE=1 HOME=/root TERM=dumb
say "starting job"   # the host times the boot up to this line

# stdout goes to the share and to the console (the host shows the console tail on a hang);
# the exit code is written last, so its presence means the job ran to the end.
{
    ( echo 0 > $CG/job.scope/cgroup.procs || exit 125
      exec chroot $ROOT /bin/sh /run/guest-results/job.sh )
    echo $? > $R/exit_code.tmp
    # Leftovers of the job (or of cgroups its tests made) may still hold the stdout pipe open,
    # and tee would then wait for them forever: kill every cgroup below the root.
    for k in $CG/*/cgroup.kill; do echo 1 > "$k"; done
} 2> $R/stderr | tee $R/stdout
mv $R/exit_code.tmp $R/exit_code || say "warning: the job left no exit code"

say "job done, exit code $(cat $R/exit_code 2>/dev/null)"
sync
umount $R
poweroff -f
