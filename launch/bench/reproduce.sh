#!/usr/bin/env bash
# Reproduces docs/benchmarks.md on one machine (2 cores here): every measurement, in order.
# Results land in ${BENCH_OUT:-runs/benchmarks}/<n>-<name>/ (summary.md, results.csv, plots).
# A finished run is skipped when the script is run again, so it can be resumed.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${BENCH_OUT:-runs/benchmarks}
CFG=launch/configs/bench-fashion-mnist.toml
mkdir -p "$OUT"
step() { echo; echo "=== $*"; }

# 2. Time to accuracy, Fashion-MNIST with Dirichlet(0.3) label skew (virtual clock). FedAvg runs
#    15 rounds; its final accuracy is the target the others (60 rounds) must reach.
step "2a. Fashion-MNIST dirichlet(0.3): FedAvg, 15 rounds"
elfish-mpi bench --config $CFG -n 5 --strategies fedavg --seeds 0 --partitions dirichlet \
    --set data.alpha=0.3 --set workers.throttle=virtual --set run.rounds=15 --clock virtual --out "$OUT/2-tta-fmnist-fedavg"
target=$(python -c "import csv,sys; print(next(csv.DictReader(open(sys.argv[1])))['final_accuracy'])" "$OUT/2-tta-fmnist-fedavg/results.csv")
step "2b. Fashion-MNIST dirichlet(0.3): the others, 60 rounds, target $target"
elfish-mpi bench --config $CFG -n 5 --strategies fedavg-drop,fedprox-partial,heterofl,fedrolex,elfish,elfish-naive \
    --seeds 0 --partitions dirichlet --set data.alpha=0.3 --set workers.throttle=virtual --set run.rounds=60 \
    --clock virtual --target-accuracy "$target" --out "$OUT/2-tta-fmnist-others"

step "2c. FEMNIST, natural writer partition: FedAvg, 15 rounds"
FEM=(--set data.name=femnist --set data.partition=natural --set data.test_samples=2000 --set workers.throttle=virtual)
elfish-mpi bench --config $CFG -n 5 --strategies fedavg --seeds 0 "${FEM[@]}" --set run.rounds=15 \
    --clock virtual --out "$OUT/2-tta-femnist-fedavg"
target=$(python -c "import csv,sys; print(next(csv.DictReader(open(sys.argv[1])))['final_accuracy'])" "$OUT/2-tta-femnist-fedavg/results.csv")
step "2d. FEMNIST natural: the others, 60 rounds, target $target"
elfish-mpi bench --config $CFG -n 5 --strategies fedavg-drop,fedprox-partial,heterofl,fedrolex,elfish,elfish-naive \
    --seeds 0 "${FEM[@]}" --set run.rounds=60 --clock virtual --target-accuracy "$target" --out "$OUT/2-tta-femnist-others"

# 3. Accuracy at an equal time budget, 5 seeds (virtual clock; every strategy 20 rounds, budget 5.5 s).
step "3. equal budget, 5 seeds"
BUDGET=(--config $CFG -n 5 --seeds 0,1,2,3,4 --partitions dirichlet --set data.alpha=0.3 --set workers.throttle=virtual
        --clock virtual --time-budget 5.5)
elfish-mpi bench "${BUDGET[@]}" --strategies fedavg,fedavg-drop,fedprox-partial,heterofl,fedrolex,elfish,elfish-naive \
    --out "$OUT/3-budget"
# 3b. The aggregation ablation over the balancing exponent b (strategy.balance; 0.5, the default, is in 3).
for b in 0 1 2; do
    step "3b. balance exponent $b"
    elfish-mpi bench "${BUDGET[@]}" --strategies elfish,elfish-naive --set strategy.balance=$b --out "$OUT/3b-balance-$b"
done

# 7. The paper's setting: AlexNet-style CNN on CIFAR-10, the paper's fleet (1, 0.2, 0.533), virtual clock.
step "7. CIFAR-10, AlexNet-style, paper fleet"
elfish-mpi bench --config $CFG -n 4 --strategies fedavg,elfish --seeds 0 --fleets paper \
    --set data.name=cifar10 --set model.name=alexnet --set data.test_samples=2000 --set train.local_steps=10 \
    --set train.lr=0.02 --set workers.throttle=virtual --set run.rounds=20 --clock virtual --out "$OUT/7-cifar10-paper"

# 1. Round-time balance (wall clock, sleep throttle): ELFISH vs FedAvg vs the ideal fleet.
step "1. round-time balance"
elfish-mpi bench --config $CFG -n 5 --strategies fedavg,elfish --seeds 0 --fleets quickstart \
    --set run.rounds=15 --out "$OUT/1-balance"
elfish-mpi bench --config $CFG -n 5 --strategies fedavg --seeds 0 --fleets uniform \
    --set run.rounds=15 --out "$OUT/1-balance-ideal"

# 5 (also): ELFISH evaluating every 5th round.
elfish-mpi bench --config $CFG -n 5 --strategies elfish --seeds 0 --fleets quickstart \
    --set run.rounds=30 --set run.eval_every=5 --out "$OUT/5-overhead-eval5"

# 4, 5, 6: soft-training speed, overhead share, bytes per round.
step "4. soft-training speed"
elfish-mpi perf soft-training | tee "$OUT/4-soft-training.md"
elfish-mpi perf soft-training --models resnet18,vit-tiny --repeats 5 --steps 5 \
    --cifar-path "${CIFAR:-../shared/datasets/cifar10_jpeg.npz}" | tee "$OUT/4-soft-training-resnet18-vit.md"
step "5. overhead"
elfish-mpi perf overhead "$OUT"/1-balance/runs/quickstart/*/*/seed0/checkpoint.h5 \
    "$OUT"/1-balance-ideal/runs/uniform/*/fedavg/seed0/checkpoint.h5 \
    "$OUT"/2-tta-fmnist-others/runs/quickstart/dirichlet/elfish/seed0/checkpoint.h5 \
    "$OUT"/5-overhead-eval5/runs/quickstart/*/elfish/seed0/checkpoint.h5 | tee "$OUT/5-overhead.md"
step "6. communication"
elfish-mpi perf communication "$OUT"/1-balance/runs/quickstart/*/elfish/seed0/checkpoint.h5 | tee "$OUT/6-communication.md"
mpiexec -n 5 elfish-mpi perf transport --keep 1,1,0.5,0.25 | tee -a "$OUT/6-communication.md"

# 8: how fast a job ends, and whether it names the rank, after a SIGKILL.
step "8. a killed rank"
python "$(dirname "$0")/kill_latency.py" --repeats 10 --rank 2 | tee "$OUT/8-kill-latency.md"
python "$(dirname "$0")/kill_latency.py" --repeats 5 --rank 0 | tee -a "$OUT/8-kill-latency.md"

# 9. Throttle calibration: the cgroup throttle (needs root and a writable cgroup cpu controller).
step "9. cgroup throttle calibration, 3 runs"
for i in 1 2 3; do
    mpiexec -n 5 elfish-mpi calibrate --throttle cgroup --capacity 1,1,0.5,0.25 | tee -a "$OUT/9-calibrate-cgroup.md" || true
done
for i in 1 2 3; do  # the quotas as computed, not matched at start-up
    mpiexec -n 5 elfish-mpi calibrate --throttle cgroup --capacity 1,1,0.5,0.25 --match-seconds 0 \
        | tee -a "$OUT/9-calibrate-cgroup-unmatched.md" || true
done

# 10. Rank 0 off the critical path: FedAvg / ELFISH round times with the whole test set and
#     with 2,000 images (evaluation spread over the ranks), and the job at 5, 17 and 33 ranks.
step "10. evaluation spread over the ranks"
elfish-mpi bench --config $CFG -n 5 --strategies fedavg,elfish --seeds 0,1 --fleets quickstart --set run.rounds=8 \
    --set data.test_samples=0 --set train.local_steps=30 --out "$OUT/10-eval-full"
elfish-mpi bench --config $CFG -n 5 --strategies fedavg,elfish --seeds 0,1 --fleets quickstart --set run.rounds=8 \
    --out "$OUT/10-eval-2000"
[ -e "$OUT/10-ranks" ] || python "$(dirname "$0")/ranks.py" --ranks 5,9,17,33 --out "$OUT/10-ranks" \
    --set run.rounds=4 --set strategy.profile=quick
[ -e "$OUT/10-ranks-65" ] || python "$(dirname "$0")/ranks.py" --ranks 65 --out "$OUT/10-ranks-65" \
    --set run.rounds=3 --set strategy.profile=quick
[ -e "$OUT/10-ranks-alexnet" ] || python "$(dirname "$0")/ranks.py" --ranks 5,9,17 --out "$OUT/10-ranks-alexnet" \
    --set run.rounds=4 --set strategy.profile=quick --set model.name=alexnet --set data.name=cifar10 --set train.local_steps=5
python "$(dirname "$0")/exit_latency.py" --ranks 5,9 --repeats 5 | tee "$OUT/10-exit-latency.md"
python "$(dirname "$0")/cpu_costs.py" | tee "$OUT/10-cpu-costs.md"

# 11. Checkpoint size with a long mask history, format_version 2 against 1.
step "11. checkpoint size"
python "$(dirname "$0")/checkpoint_size.py" | tee "$OUT/11-checkpoint-size.md"

# 12. ResNet-18 (static BatchNorm) on CIFAR-10, the paper's fleet, virtual clock, 3 seeds.
step "12. ResNet-18 on CIFAR-10"
elfish-mpi bench --config launch/configs/bench-cifar10-resnet18.toml -n 4 --strategies fedavg,heterofl,fedrolex,elfish \
    --seeds 0,1,2 --clock virtual --set data.path="${CIFAR:-../shared/datasets/cifar10_jpeg.npz}" --out "$OUT/12-resnet18"

# 13. Clients apart from ranks: FEMNIST, 300 writers = 300 clients, 30 a round, lognormal speeds, 3 seeds;
#     the strategies with the shortest rounds continue to 80 rounds (the bench resumes them).
step "13. FEMNIST, 300 clients, 30 a round"
FEMC=(--config launch/configs/bench-femnist-clients.toml -n 4 --seeds 0,1,2 --clock virtual
      --set data.path="${FEMNIST:-../shared/datasets/femnist.npz}" --out "$OUT/13-femnist-clients")
elfish-mpi bench "${FEMC[@]}" --strategies fedavg,fedavg-drop,fedprox-partial,heterofl,fedrolex,elfish
elfish-mpi bench "${FEMC[@]}" --strategies fedavg-drop,fedprox-partial,elfish --set run.rounds=80

# 14. 1,000 clients, 100 a round, on 5 and 17 ranks.
step "14. 1,000 clients on 5 and 17 ranks"
python "$(dirname "$0")/clients_scale.py" --ranks 5,17 --rounds 5 --out "$OUT/14-clients-scale" | tee "$OUT/14-clients-scale.md"

# 15. The same FedAvg job side by side with Flower's simulation (Ray), 4 and 8 clients, 3 repeats
#     alternated; Flower runs in its own virtualenv (.venv-flower), which the script makes if missing.
step "15. side by side with Flower's simulation"
[ -e "$OUT/15-flower/summary.md" ] || python "$(dirname "$0")/flower.py" --clients 4,8 --rounds 15 --repeats 3 \
    --out "$OUT/15-flower" | tee "$OUT/15-flower.md"
[ -e "$OUT/15-flower-2w/summary.md" ] || python "$(dirname "$0")/flower.py" --clients 4,8 --ours-workers 2 --rounds 15 \
    --repeats 3 --out "$OUT/15-flower-2w" | tee "$OUT/15-flower-2w.md"
