#!/usr/bin/env bash
# Trains and scores the GAN / WGAN / WGAN-GP configs (configs/*-gan.toml, *-wgan.toml,
# *-wgan-gp.toml) one after another, single-threaded, each under the shared timing lock, and
# prints each run's wall time and its sample metrics. Usage: scripts/gan_measure.sh [NAME...]
set -euo pipefail
ELBO=${ELBO:-target/release/elbo}
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  names=(8gaussians-wgan-gp 25gaussians-wgan-gp 8gaussians-gan 25gaussians-gan 8gaussians-wgan
         25gaussians-wgan digits-gan digits-wgan-gp)
fi
for n in "${names[@]}"; do
  start=$(date +%s.%N)
  RAYON_NUM_THREADS=1 flock /work/timing.lock nice -n 0 "$ELBO" train --config "configs/$n.toml" \
    --out "runs/$n" --force > "runs/$n.train.log" 2>&1
  end=$(date +%s.%N)
  echo "$n: train wall $(echo "$end - $start" | bc) s (includes waiting for the lock)"
  RAYON_NUM_THREADS=1 "$ELBO" eval --run "runs/$n" > "runs/$n.eval.log" 2>&1 || true
  grep "sample metric" "runs/$n.eval.log" || tail -3 "runs/$n.eval.log"
done
