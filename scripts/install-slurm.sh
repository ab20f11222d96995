#!/bin/sh
# Install a single-node Slurm (controller, node daemon, client tools) and munge for the real-Slurm tests.
# Idempotent: does nothing when slurmctld, slurmd, sbatch and munged are already installed.
# Needs root (or sudo) and apt (Debian/Ubuntu). It installs only; tests/slurm_cluster.py configures and starts
# a throwaway cluster in a temporary directory.
set -eu
if command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
   && command -v sbatch >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
    echo "slurm already installed: $(slurmctld -V)"
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge
echo "installed: $(slurmctld -V)"
