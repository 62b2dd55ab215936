"""`elfish-mpi bench`: the pure parts (metrics, tables, plots) on real checkpoints of tiny jobs."""
import contextlib
import csv
import io
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from elfish_mpi import analysis, bench, report

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "data" / "fashion-mnist"
TINY = [
    "--set", f"data.path={SAMPLE}", "--set", "data.test_samples=200", "--set", "data.max_samples=300",
    "--set", "run.rounds=3", "--set", "train.local_steps=2", "--set", "workers.throttle=none",
    "--set", "workers.capacity=[1.0, 0.5]",
]


def bench_args(out: Path, *extra: str) -> list[str]:
    return ["--strategies", "fedavg,elfish", "--out", str(out), "-n", "3", "--seeds", "0",
            "--run-timeout", "240", *TINY, *extra]


def run_bench(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = bench.main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished bench of two real 3-rank jobs (fedavg, elfish; 3 rounds on the test sample)."""
    out = tmp_path_factory.mktemp("bench") / "b"
    rc, stdout, stderr = run_bench(bench_args(out))
    assert rc == 0, stdout + stderr
    return out, stdout


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def fake_result(strategy: str, seed: int, acc, wall, workers: int = 2, fleet="f", part="iid") -> analysis.Run:
    acc = np.asarray(acc, dtype=float)
    wall = np.asarray(wall, dtype=float)
    rounds = len(acc)
    rt = np.diff(np.concatenate([[0.0], wall]))
    busy = np.tile(np.linspace(0.3, 1.0, workers), (rounds, 1)) * rt[:, None]
    return analysis.Run.from_arrays(
        strategy=strategy, seed=seed, fleet=fleet, partition=part,
        metrics={"round": np.arange(1, rounds + 1), "round_time": rt, "virtual_time": rt / 2, "wall_clock": wall,
                 "test_accuracy": acc},
        workers={"busy_time": busy, "idle_time": rt[:, None] - busy, "bytes_sent": np.full((rounds, workers), 1000.0),
                 "keep_ratio": np.tile(np.linspace(1.0, 0.25, workers), (rounds, 1))},
        config={"workers": {"capacity": [1.0, 0.25][:workers] if workers == 2 else [1.0] * workers}},
    )


# ---------------------------------------------------------------- the real bench
def test_bench_writes_runs_tables_and_plots(done):
    out, stdout = done
    for name in ("results.csv", "summary.csv", "summary.md", "accuracy_vs_wall.png", "accuracy_vs_virtual.png", "timeline.png"):
        assert (out / name).is_file(), name
    for strategy in ("fedavg", "elfish"):
        run = out / "runs" / "custom" / "iid" / strategy / "seed0"
        assert (run / "checkpoint.h5").is_file() and (run / "stdout.log").is_file()
        assert "round    3/3" in (run / "stdout.log").read_text()
    assert "[1/2] custom/iid fedavg seed 0" in stdout and "[2/2] custom/iid elfish seed 0" in stdout
    assert "round 3/3" in stdout and "done" in stdout


def test_results_csv_has_one_row_per_run(done):
    out, _ = done
    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == analysis.RESULT_COLUMNS
    assert [(r["strategy"], r["seed"], r["rounds"]) for r in rows] == [("fedavg", "0", "3"), ("elfish", "0", "3")]
    fedavg, elfish = rows
    for r in rows:
        assert 0.0 < float(r["final_accuracy"]) <= float(r["best_accuracy"]) <= 1.0
        assert float(r["median_round_time"]) > 0 and float(r["median_virtual_round_time"]) > 0
        assert 0.0 <= float(r["idle_share"]) < 1.0
        assert float(r["bytes_per_round"]) > 0
        assert r["accuracy_at_budget"] == ""  # no --time-budget
    # The default target is FedAvg's final accuracy of the same seed, which FedAvg itself reaches.
    assert fedavg["target_accuracy"] == elfish["target_accuracy"] == fedavg["final_accuracy"]
    assert 0 < float(fedavg["time_to_target"]) <= float(fedavg["wall_clock"])


def test_summary_has_a_row_per_strategy(done):
    out, _ = done
    md = (out / "summary.md").read_text()
    assert "elfish-mpi bench --strategies fedavg,elfish" in md and "**date**" in md and "cores" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| strategy | seeds | final accuracy | time to target | median round | speedup")
    assert [line.split("|")[1].strip() for line in table[1:]] == ["fedavg", "elfish"]
    assert "1.00×" in table[1]  # FedAvg against itself
    rows = read_csv(out / "summary.csv")
    assert list(rows[0]) == analysis.SUMMARY_COLUMNS
    assert [r["strategy"] for r in rows] == ["fedavg", "elfish"]
    assert float(rows[0]["speedup_vs_fedavg"]) == pytest.approx(1.0)


def test_plots_are_pngs_of_a_readable_size(done):
    out, _ = done
    for name in ("accuracy_vs_wall.png", "accuracy_vs_virtual.png", "timeline.png"):
        width, height = png_size(out / name)
        assert 800 <= width <= 3000 and 400 <= height <= 3000, (name, width, height)
        assert (out / name).stat().st_size > 10_000


def test_a_finished_bench_is_skipped_on_a_second_run(done):
    out, _ = done
    ckpt = out / "runs" / "custom" / "iid" / "fedavg" / "seed0" / "checkpoint.h5"
    before = ckpt.stat().st_mtime_ns
    rc, stdout, stderr = run_bench(bench_args(out))
    assert rc == 0, stdout + stderr
    assert stdout.count("finished earlier (round 3), skipped") == 2
    assert "starting" not in stdout
    assert ckpt.stat().st_mtime_ns == before
    assert len(read_csv(out / "results.csv")) == 2


def test_run_state_follows_the_config(done):
    out, _ = done
    plan = lambda *sets: bench.plan_runs(  # noqa: E731
        config=None, strategies=["fedavg"], seeds=[0], fleets=[], partitions=[],
        sets=[a for a in TINY if a != "--set"] + list(sets), out=out, num_workers=2)
    assert bench.checkpoint_state(plan()[0])[0] == "done"
    longer = plan("run.rounds=5")[0]  # more rounds: continue the run
    assert bench.checkpoint_state(longer) == ("partial", "round 3 of 5")
    cmd = bench.train_command(longer, ["mpiexec"], 3, None, resume=True)
    assert cmd[cmd.index("--resume") + 1] == str(longer.run_dir)
    state, detail = bench.checkpoint_state(plan("train.lr=0.1")[0])  # another config: refused
    assert state == "conflict" and "train.lr" in detail


def test_result_metrics_from_a_real_checkpoint(done):
    out, _ = done
    runs = bench.plan_runs(config=None, strategies=["fedavg", "elfish"], seeds=[0], fleets=[], partitions=[],
                           sets=[a for a in TINY if a != "--set"], out=out, num_workers=2)
    results = [analysis.open_run(r.run_dir, rounds=r.rounds, fleet=r.fleet, partition=r.partition, strategy=r.strategy, seed=r.seed)
               for r in runs]
    assert [r.strategy for r in results] == ["fedavg", "elfish"]
    for r in results:
        assert r.rounds == 3 and r.num_workers == 2
        rt = r.metrics["round_time"].to_numpy()
        # idle + busy fill each worker's round
        np.testing.assert_allclose(r.per_worker("idle_time") + np.minimum(r.per_worker("busy_time"), rt[:, None]), np.tile(rt, (2, 1)).T, rtol=1e-9)
    x, mean, lo, hi = report.curve_over_seeds(results[:1], "virtual")
    np.testing.assert_allclose(x, np.cumsum(results[0].metrics["virtual_time"]))
    np.testing.assert_allclose(mean, results[0].metrics["test_accuracy"])


# ---------------------------------------------------------------- failures
def write_launcher(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def test_failed_runs_are_reported_and_the_bench_goes_on(tmp_path):
    launcher = write_launcher(tmp_path / "fail.sh", 'echo "round    1/3  acc  12.00%  time   0.1s  keep [1.00]"\n'
                                                    'echo "rank 1: something broke" >&2\nexit 3')
    rc, stdout, _ = run_bench(bench_args(tmp_path / "b", "--launcher", launcher))
    assert rc == 1
    assert stdout.count("FAILED (exit 3)") == 2  # both runs were tried
    assert "something broke" in stdout
    assert "2 of 2 runs failed" in stdout
    assert not (tmp_path / "b" / "results.csv").exists()


def test_a_run_over_the_timeout_is_killed(tmp_path):
    launcher = write_launcher(tmp_path / "hang.sh", "exec sleep 60")
    rc, stdout, _ = run_bench(bench_args(tmp_path / "b", "--launcher", launcher, "--run-timeout", "1",
                                         "--strategies", "fedavg"))
    assert rc == 1
    assert "over --run-timeout 1s" in stdout


@pytest.mark.parametrize("extra, message", [
    (["--strategies", "fedavg,sgd"], "unknown strategy 'sgd'"),
    (["-n", "1"], "-n must be at least 2"),
    (["--set", "run.seed=3"], "use --seeds"),
    (["--fleets", "quickstart"], "--fleets replaces the capacity list"),
    (["--set", "train.lr=-1"], "train.lr"),
    (["-n", "4"], "workers.capacity has 2 value(s)"),
])
def test_bad_arguments_exit_2_before_any_run(tmp_path, extra, message):
    rc, stdout, stderr = run_bench(bench_args(tmp_path / "b", *extra))
    assert rc == 2
    assert message in stderr
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------- the plan
def test_naive_variant_maps_to_naive_aggregation():
    assert bench.variant_overrides("elfish") == ["strategy.name=elfish"]
    assert bench.variant_overrides("elfish-naive") == ["strategy.name=elfish", "strategy.aggregation=naive"]
    assert bench.variant_overrides("fedavg-drop-naive") == ["strategy.name=fedavg-drop", "strategy.aggregation=naive"]
    assert bench.variant_overrides("fedavg-drop") == ["strategy.name=fedavg-drop"]
    with pytest.raises(bench.BenchUsageError):
        bench.variant_overrides("sgd-naive")


def test_plan_covers_every_combination_with_the_overrides_in_order(tmp_path):
    runs = bench.plan_runs(config=None, strategies=["fedavg", "elfish-naive"], seeds=[0, 1],
                           fleets=["quickstart", "paper"], partitions=["iid", "dirichlet"],
                           sets=["run.rounds=2"], out=tmp_path, num_workers=4)
    assert len(runs) == 2 * 2 * 2 * 2
    r = next(r for r in runs if (r.fleet, r.partition, r.strategy, r.seed) == ("paper", "dirichlet", "elfish-naive", 1))
    assert r.overrides == ["strategy.name=elfish", "strategy.aggregation=naive", "run.seed=1", "workers.fleet=paper",
                           "workers.capacity=[]", "data.partition=dirichlet", "run.rounds=2"]
    assert r.run_dir == (tmp_path / "runs" / "paper" / "dirichlet" / "elfish-naive" / "seed1").resolve()
    assert r.config["strategy"]["aggregation"] == "naive" and r.config["workers"]["fleet"] == "paper"
    assert r.rounds == 2
    cmd = bench.train_command(r, ["/x/mpiexec"], 5, None, resume=False)
    assert cmd[:7] == ["/x/mpiexec", "-n", "5", sys.executable, "-m", "elfish_mpi", "train"]
    assert "--resume" not in cmd and "--config" not in cmd
    assert cmd[cmd.index("--out") + 1] == str(r.run_dir)


def test_an_unknown_fleet_is_a_config_error(tmp_path):
    with pytest.raises(bench.ConfigError, match="workers.fleet"):
        bench.plan_runs(config=None, strategies=["fedavg"], seeds=[0], fleets=["nope"], partitions=[], sets=[],
                        out=tmp_path, num_workers=2)


def test_launcher_is_found_next_to_python_or_on_path():
    words = bench.resolve_launcher("mpiexec -bind-to none")
    assert Path(words[0]).name == "mpiexec" and os.path.isabs(words[0]) and words[1:] == ["-bind-to", "none"]
    with pytest.raises(bench.BenchUsageError):
        bench.resolve_launcher("no-such-launcher-xyz")


# ---------------------------------------------------------------- pure metrics
def test_time_to_target():
    acc = [0.2, np.nan, 0.5, 0.7, 0.65, 0.8]
    wall = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert analysis.time_to_target(acc, wall, 0.5) == 3.0  # reached exactly
    assert analysis.time_to_target(acc, wall, 0.6) == 4.0  # first round at or above, not the last
    assert analysis.time_to_target(acc, wall, 0.1) == 1.0
    assert math.isnan(analysis.time_to_target(acc, wall, 0.9))  # never
    assert math.isnan(analysis.time_to_target(acc, wall, None))
    assert math.isnan(analysis.time_to_target([np.nan, np.nan], [1.0, 2.0], 0.0))  # unevaluated rounds never count


def test_accuracy_at_budget_and_idle_share():
    acc = [0.2, np.nan, 0.5, 0.7]
    wall = [1.0, 2.0, 3.0, 4.0]
    assert analysis.accuracy_at_budget(acc, wall, 3.5) == 0.5
    assert analysis.accuracy_at_budget(acc, wall, 2.5) == 0.2  # round 2 was not evaluated
    assert math.isnan(analysis.accuracy_at_budget(acc, wall, 0.5))
    assert math.isnan(analysis.accuracy_at_budget(acc, wall, None))
    idle = np.array([[0.0, 1.0], [0.5, 1.5]])
    assert analysis.idle_share(idle, [2.0, 2.0]) == pytest.approx(3.0 / 8.0)


def test_targets_default_to_fedavg_of_the_same_seed():
    results = [fake_result("fedavg", 0, [0.5, 0.6], [1, 2]), fake_result("fedavg", 1, [0.5, 0.7], [1, 2]),
               fake_result("elfish", 0, [0.55, 0.65], [0.5, 1.0]), fake_result("elfish", 2, [0.5, 0.6], [1, 2])]
    rows = analysis.results_table(results).to_dict("records")
    by = {(r["strategy"], r["seed"]): r for r in rows}
    assert by[("elfish", 0)]["target_accuracy"] == 0.6 and by[("elfish", 0)]["time_to_target"] == 1.0
    assert math.isnan(by[("elfish", 2)]["target_accuracy"])  # no FedAvg run of seed 2
    explicit = analysis.results_table(results, target_accuracy=0.55, budget=0.7).to_dict("records")
    assert len(explicit) == len(results) and all(r["target_accuracy"] == 0.55 for r in explicit)
    assert next(r for r in explicit if (r["strategy"], r["seed"]) == ("elfish", 0))["accuracy_at_budget"] == 0.55


def test_summary_aggregates_over_seeds():
    results = [fake_result("fedavg", s, [0.5, a], [2, 4]) for s, a in ((0, 0.6), (1, 0.7))]
    results += [fake_result("elfish", s, [0.55, a], [1, 2]) for s, a in ((0, 0.62), (1, 0.64))]
    summary = analysis.summarize(analysis.results_table(results), ["fedavg", "elfish"])
    fedavg, elfish = summary.to_dict("records")
    assert (fedavg["strategy"], fedavg["seeds"]) == ("fedavg", 2)
    assert fedavg["final_accuracy_mean"] == pytest.approx(0.65)
    assert fedavg["final_accuracy_std"] == pytest.approx(np.std([0.6, 0.7], ddof=1))
    assert elfish["speedup_vs_fedavg"] == pytest.approx(2.0)
    assert elfish["bytes_per_round"] == 2000.0
    assert elfish["target_reached"] == 1 and elfish["time_to_target_mean"] == 2.0  # 0.62 >= 0.6, 0.64 < 0.7
    md = analysis.summary_markdown(summary, {"command": "`x`"}, budget=None)
    assert "| elfish | 2 | 63.00% ± 1.41 | 2.000 s (1/2) | 1.000 s | 2.00×" in md


def test_plots_from_hand_made_results(tmp_path):
    results = [fake_result("fedavg", s, [0.3, 0.5, 0.6 + 0.01 * s], [2, 4, 6]) for s in (0, 1, 2)]
    results += [fake_result("elfish", s, [0.35, 0.55, 0.6], [1, 2, 3.5 + s]) for s in (0, 1, 2)]
    names = report.write_plots(results, tmp_path, prefix="f_iid_", title="test", timeline_rounds=2, target=0.6)
    assert names == ["f_iid_accuracy_vs_wall.png", "f_iid_accuracy_vs_virtual.png", "f_iid_timeline.png"]
    for name in names:
        png_size(tmp_path / name)
    assert [r.strategy for r in report.timeline_panels(results)] == ["fedavg", "elfish"]
    x, mean, lo, hi = report.curve_over_seeds(results[3:], "wall")
    np.testing.assert_allclose(x, [1, 2, 4.5])  # mean time at the end of each round
    x, mean, lo, hi = report.curve_over_seeds(results[:3], "virtual")
    np.testing.assert_allclose(x, [1, 2, 3])  # cumulative virtual time
    np.testing.assert_allclose(lo, [0.3, 0.5, 0.6])
    np.testing.assert_allclose(mean, [0.3, 0.5, 0.61])
    np.testing.assert_allclose(hi, [0.3, 0.5, 0.62])


# ---------------------------------------------------------------- progress
def test_progress_lines():
    run = bench.RunSpec("quickstart", "iid", "elfish", 2, Path("r"), [], 10, {})
    m = bench.ROUND_RE.match("round    3/10  acc 54.20%  time   0.977s  keep [1.00 1.00 0.96 0.25]")
    assert m and m.groups() == ("3", "10", "54.20%")
    assert bench.ROUND_RE.match("round    4/10  acc    -    time   0.977s  keep [1.00]").group(3) == "-"
    # without a terminal: a line when a run starts and when it ends, nothing per round
    plain = io.StringIO()
    p = bench.Progress(4, stream=plain, tty=False)
    p.start(2, run)
    p.round(3, 10, 0.542)
    p.end(p.line(2, run, 10, 10, 0.55, 75.0, "done"))
    assert plain.getvalue() == ("[2/4] quickstart/iid elfish seed 2  round 0/10  acc    -      0.0s  starting\n"
                                "[2/4] quickstart/iid elfish seed 2  round 10/10  acc 55.00%  1m15s  done\n")
    # on a terminal: a tqdm bar of the run's rounds with its accuracy, then the final line
    tty = io.StringIO()
    p = bench.Progress(4, stream=tty, tty=True)
    p.start(2, run)
    p.round(4, 10, 0.55)
    assert p.bar is not None and p.bar.n == 4 and "acc 55.00%" in str(p.bar)
    assert "[2/4] quickstart/iid elfish seed 2" in tty.getvalue() and "4/10" in tty.getvalue()
    p.end("[2/4] done")
    assert p.bar is None and tty.getvalue().endswith("[2/4] done\n")


# ---------------------------------------------------------------- analysis and report on the real runs
def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Analysing runs"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_analysis_example_runs_as_written(done, tmp_path):
    # Prepare: runs/quickstart is one of the bench's real runs
    out, _ = done
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "quickstart").symlink_to(next(out.glob("runs/*/*/elfish/seed0")))
    # Execute
    res = subprocess.run([sys.executable, "-c", readme_snippet()], capture_output=True, text=True,
                                       cwd=tmp_path, timeout=120)
    # Assert
    assert res.returncode == 0, res.stderr
    assert "test_accuracy" in res.stdout and "final_accuracy" in res.stdout and "'conv1'" in res.stdout


def test_analysis_reads_a_run_as_dataframes(done):
    out, _ = done
    run = analysis.open_run(next(out.glob("runs/*/*/elfish/seed0")))
    assert list(run.metrics.index) == [1, 2, 3] and run.metrics.index.name == "round"
    assert {"test_accuracy", "round_time", "virtual_time", "wall_clock"} <= set(run.metrics.columns)
    assert len(run.workers) == 3 * 2 and {"round", "worker", "rank", "keep_ratio", "busy_time"} <= set(run.workers.columns)
    assert run.per_worker("busy_time").shape == (3, 2) and run.strategy == "elfish" and run.seed == 0
    assert sorted(run.coverage) == ["conv1", "conv2", "fc1"]
    masks = run.masks(3)
    assert len(masks) == 2 and all(sorted(m) == ["conv1", "conv2", "fc1"] for m in masks)
    for w in range(2):  # the masks agree with the recorded share kept
        assert masks[w]["conv1"].size / 20 == run.per_worker("keep_ratio_conv1")[2, w]
        assert np.all(np.diff(masks[w]["conv1"]) > 0)
    # a checkpoint file reads the same as its directory
    same = analysis.open_run(run.path)
    assert same.metrics.equals(run.metrics) and same.workers.equals(run.workers)


def test_analysis_refuses_a_format_version_it_cannot_read(done, tmp_path):
    import h5py

    from elfish_mpi.checkpoint import CheckpointError

    out, _ = done
    copy = tmp_path / "future.h5"
    copy.write_bytes((next(out.glob("runs/*/*/elfish/seed0")) / "checkpoint.h5").read_bytes())
    with h5py.File(copy, "r+") as f:
        f.attrs["format_version"] = np.int64(99)
    with pytest.raises(CheckpointError, match="unsupported format_version 99"):
        analysis.open_run(copy)


def test_report_of_a_bench_directory_and_of_a_run(done, tmp_path):
    # Prepare
    out, _ = done
    one = next(out.glob("runs/*/*/fedavg/seed0"))
    for what, target in (([str(out)], tmp_path / "bench"), ([str(one), str(one / "checkpoint.h5")], tmp_path / "one")):
        # Execute
        res = subprocess.run([sys.executable, "-m", "elfish_mpi", "report", *what, "--out", str(target)],
                                           capture_output=True, text=True, timeout=240, cwd=ROOT)
        # Assert: every plot is a PNG of a readable size, and the page shows the table and the plots
        assert res.returncode == 0, res.stderr
        pngs = sorted(p.name for p in target.glob("*.png"))
        assert {"curves.png", "timeline.png", "keep_ratio.png", "bytes.png"} <= set(pngs)
        assert any(p.startswith("coverage-") for p in pngs)
        for p in pngs:
            w, h = png_size(target / p)
            assert w >= 600 and h >= 250, (p, w, h)
        md = (target / "report.md").read_text()
        rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
        assert len(rows) == len(what) if target.name == "one" else len(rows) == 2
        assert all(f"![{p}]({p})" in md for p in pngs)
    bad = subprocess.run([sys.executable, "-m", "elfish_mpi", "report", str(tmp_path / "nothing"), "--out",
                                        str(tmp_path / "x")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "no such run directory or checkpoint" in bad.stderr and "Traceback" not in bad.stderr
