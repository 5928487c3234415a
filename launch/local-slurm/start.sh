#!/usr/bin/env bash
# Starts a one-node Slurm cluster (munged, slurmctld, slurmd) on this machine, as root: the cluster the
# Slurm tests submit to (tests/test_launch_slurm.py). Installs Debian's slurm-wlm and munge when missing.
# Safe to run again: keeps daemons that run already. Refuses to replace a Slurm config it did not write.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
marker="# Written by mmfm launch/local-slurm/start.sh"
conf=/etc/slurm/slurm.conf
if [ -f "$conf" ] && ! grep -qxF "$marker" "$conf"; then
  echo "$conf exists and was not written by $0; not replacing a real cluster's config" >&2
  exit 1
fi
if ! command -v slurmctld >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null
fi
host=$(hostname)
cpus=$(nproc)
mem_mib=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))  # slurmd drains a node that has less
mkdir -p /etc/slurm /var/spool/slurmd /var/spool/slurmctld /run/munge /var/log
{ echo "$marker"; sed -e "s/@HOST@/$host/g" -e "s/@CPUS@/$cpus/g" -e "s/@MEM_MIB@/$mem_mib/g" "$here/slurm.conf.template"; } >"$conf"
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
fi
chown munge:munge /run/munge 2>/dev/null || true
pgrep -x munged >/dev/null || /usr/sbin/munged --force
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 30); do
  sinfo -h -o %t 2>/dev/null | grep -qE 'idle|mix|alloc' && exit 0
  sleep 1
done
echo "slurm did not come up; see /var/log/slurmctld.log and /var/log/slurmd.log" >&2
exit 1
