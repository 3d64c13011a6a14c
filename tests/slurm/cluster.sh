#!/usr/bin/env bash
# Bring up a one-node SLURM cluster on this machine (root, Debian's slurm-wlm and munge), for the
# tests: `cluster.sh up` installs what is missing, writes slurm.conf and starts munged, slurmctld
# and slurmd; `cluster.sh down` stops them. Idempotent.
set -euo pipefail

node=$(hostname -s)
conf_dir=/etc/slurm

# alive, not a zombie left by an earlier daemon that nobody reaped
running() { pgrep -x -r R,S,D "$1" >/dev/null; }

up() {
    # a cluster this script did not set up (the host's own): use it as it is, never rewrite its slurm.conf;
    # the test submits to whatever partition sinfo marks as the default
    if command -v sinfo >/dev/null && ! grep -qs '^ClusterName=thimble-test$' "$conf_dir/slurm.conf" \
        && sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        echo "a SLURM cluster is already up here; using it as it is:"
        sinfo
        return 0
    fi
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge && chown munge:munge /run/munge
    running munged || runuser -u munge -- /usr/sbin/munged

    mkdir -p "$conf_dir" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    cat > "$conf_dir/slurm.conf" <<CONF
ClusterName=thimble-test
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
NodeName=$node CPUs=$(nproc) RealMemory=20000 State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    if ! running slurmctld; then
        pkill -x slurmscriptd || true  # a helper left by a killed controller holds its port
        slurmctld
    fi
    running slurmd || slurmd
    for _ in $(seq 60); do
        if sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            sinfo
            return 0
        fi
        scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    echo "the SLURM node did not become idle; see /var/log/slurm/" >&2
    sinfo >&2 || true
    return 1
}

down() {
    pkill -x slurmd || true
    pkill -x slurmctld || true
    pkill -x slurmscriptd || true
}

"${1:-up}"
