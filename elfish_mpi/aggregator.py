"""Rank 0: the round loop. Select clients -> plan -> place them on the worker ranks ->
broadcast plan, masks and model -> collect the updates -> recover the global model ->
evaluate -> record -> checkpoint."""
from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckptmod
from . import clients as clientsmod
from . import profiling, provenance, signals, supervisor
from .evaluation import EvalSplit, combine, evaluate_chunks, image_range, num_chunks
from .comm import Comm, RankFailure, RoundTimeout
from .fleet import load_trace
from .config import Config
from .masking import compute_ratio, keep_ratio, make_masks
from .models import ModelSpec
from .planner import Planner
from .profiling import macs_fraction
from .strategies import make_strategy
from .transport import receive
from .submodel import flat_from_state_dict, flat_params, full_model, load_flat, param_index, state_dict_from_flat
from .protocol import Plan, eval_buffer, pack_masks, peak_memory
from .worker import match_quotas

STOP_BCAST = "the broadcast that ends the run (a worker rank stopped answering)"
MASKS_BCAST = "the broadcast of the round's masks (a worker rank stopped answering)"
EVAL_BCAST = "the broadcast of the model to evaluate (a worker rank stopped answering)"


class Aggregator:
    def __init__(self, comm: Comm, cfg: Config, spec: ModelSpec, setup: dict, test):
        self.comm, self.cfg, self.spec = comm, cfg, spec
        self.num_workers = comm.size - 1
        self.setup = setup
        self.out = Path(cfg.run.out)
        self.x_test, self.y_test = test
        self.test_images = len(self.y_test)
        self.eval_split = EvalSplit(num_chunks(self.test_images), cfg.run.eval_on)  # who evaluates what (evaluation.py)
        self.eval_plan: tuple[int, tuple] | None = None  # (rank 0's chunks, the workers' ranges) sent with a plan
        self.clients = clientsmod.build(cfg, self.num_workers, setup["speeds"])
        self.strategy = make_strategy(cfg, spec, self.clients.count)
        self.start_capacity = list(self.clients.speeds)  # each client's
        self.trace = load_trace(cfg.workers.trace, self.clients.count) if cfg.workers.trace else None
        # each worker rank's capacity outside training: its client's when pinned, else full speed
        self.rank_capacity = self.rank_capacities(self.start_capacity)
        self.quota_correction: np.ndarray | None = None  # each worker rank's cgroup quota scale (match_quotas)
        # every client takes part, each on its own rank: /workers/<name>[:, w] is worker rank w + 1's
        self.slots_are_ranks = self.clients.pinned and self.clients.per_round == self.clients.count
        self.model = full_model(spec)  # (the evaluation's module: the flat model is loaded into it)
        # the cost polynomial is fitted here, at start-up, not in round 1 or the profiling (2 s for
        # ResNet-18), for a strategy that cuts sub-networks or plans from profiles (FedAvg: never)
        if self.strategy.cuts or self.strategy.needs_planner:
            spec.macs(spec.full_widths())
        resume = setup.get("resume_ckpt")
        if resume is not None:
            self._restore(resume)
        else:
            torch.manual_seed(cfg.run.seed)
            self.flat = flat_params(spec.init_module())
            self.start_round = 0
            self.metrics: dict[str, list] = {}
            self.workers: dict[str, list] = {}
            self.masks: dict[int, list] = {}
            self.coverage = {name: np.zeros(spec.full_widths()[name], dtype=np.int64) for name in spec.maskable}
            self.profiles: dict[str, np.ndarray] = {}
            self.cursors = np.zeros(self.clients.count, dtype=np.int64)  # each client's data position
            self.wall_offset = 0.0

    # -- resume ---------------------------------------------------------------------
    def _restore(self, ck) -> None:
        self.flat = flat_from_state_dict(self.spec, ck.model)
        self.start_round = ck.round
        self.metrics = {k: list(v) for k, v in ck.metrics.items()}
        self.workers = {k: [list(row) for row in v] for k, v in ck.workers.items()}
        self.masks = dict(ck.masks)
        self.coverage = {k: np.asarray(v, dtype=np.int64).copy() for k, v in ck.coverage.items()}
        self.profiles = dict(ck.profiles)
        self.cursors = np.asarray(ck.state.get("cursor", np.zeros(self.clients.count)), dtype=np.int64).copy()
        wc = self.metrics.get("wall_clock", [])
        self.wall_offset = float(wc[-1]) if wc else 0.0

    # -- profiles and planning ---------------------------------------------------------
    def gather_profiles(self) -> None:
        configs = profiling.configurations(self.spec, self.cfg.strategy.profile)
        times = self.comm.gather_rows(np.zeros(len(configs)))[1:]
        # each configuration's costs, the same for every worker, counted here (a worker would
        # pay for the counting's imports: 1 s each)
        ratios = [profiling.ratios_of(self.spec, row) for row in configs]
        macs = [float(self.spec.macs(profiling.widths_for(self.spec, r))) for r in ratios]
        mem = [profiling.memory_bytes(self.spec, r, self.cfg.train.batch_size) for r in ratios]
        self.profiles = {
            "keep_ratios": configs,
            "step_time": times,
            "macs": np.tile(np.asarray(macs), (len(times), 1)),
            "memory_bytes": np.tile(np.asarray(mem), (len(times), 1)),
            "capacity": np.asarray(self.rank_capacity, dtype=np.float64),  # each rank's, while it profiled
        }

    def rank_capacities(self, capacity: list[float]) -> list[float]:
        """Each worker rank's capacity outside training, from the clients' (``capacity``)."""
        return clientsmod.rank_capacities(capacity, self.num_workers)

    def make_planner(self, state: dict | None) -> None:
        if not self.strategy.needs_planner:
            return
        p = self.profiles
        full_macs = self.spec.macs()
        fits = [profiling.fit_cost(p["macs"][w] / full_macs, p["step_time"][w]) for w in range(self.num_workers)]
        alpha, beta = [a for a, _ in fits], [b for _, b in fits]
        if not self.clients.pinned:  # the ranks profiled at full speed: a client is slower by its speed
            speeds = np.asarray(self.start_capacity, dtype=np.float64)
            alpha, beta = float(np.mean(alpha)) / speeds, float(np.mean(beta)) / speeds
        s = self.cfg.strategy
        self.strategy.planner = Planner(
            self.spec, alpha, beta,
            min_keep=s.min_keep, local_steps=self.cfg.train.local_steps, deadline=s.deadline, replan=s.replan,
        )
        if state and "planner_alpha" in state:
            self.strategy.planner.load_state(state)

    # -- the round loop ------------------------------------------------------------------
    def run(self) -> None:
        cfg, spec = self.cfg, self.spec
        resume = self.setup.get("resume_ckpt")
        self.comm.barrier()  # every rank is up: round 1's clock starts after everyone's start-up
        if self.setup["match_quotas"]:
            supervisor.note("while the workers matched their cgroup quotas")
            t_match = time.perf_counter()
            self.quota_correction = match_quotas(self.comm, None, None, self.rank_capacity, cfg.workers.match_seconds)
            print(
                "elfish-mpi: cgroup quotas scaled by each worker's CPU per step over the full-speed workers' "
                f"(workers.match_seconds, {time.perf_counter() - t_match:.1f} s): "
                + " ".join(f"{c:.3f}" for c in self.quota_correction), flush=True,
            )
        if self.setup["profile"]:
            supervisor.note("while the workers profiled")
            t_prof = time.perf_counter()
            self.gather_profiles()
            self.profiles["profiling_time"] = np.array([time.perf_counter() - t_prof])
        self.make_planner(resume.state if resume is not None else None)
        self.out.mkdir(parents=True, exist_ok=True)
        t_run = time.perf_counter()
        if self.start_round >= cfg.run.rounds:
            print(f"elfish-mpi: checkpoint is already at round {self.start_round} of run.rounds = {cfg.run.rounds}; nothing to do")
        stopped_by = None
        self.pending = None
        for rnd in range(self.start_round + 1, cfg.run.rounds + 1):
            t0, waited0, cpu0 = time.perf_counter(), self.comm.waited, time.process_time()
            supervisor.note(f"in round {rnd}")
            # 1. select this round's clients; plan what each trains (keep ratios, steps, limits),
            #    their masks, and place them on the worker ranks
            sel = self.clients.select(rnd)
            assignments = self.strategy.configure(rnd, sel)
            ratios = [a.ratios for a in assignments]
            masks = [
                make_masks(spec, ratios[i], self.strategy.mask_policy, seed=cfg.run.seed, round=rnd, worker=int(c))
                for i, c in enumerate(sel)
            ]
            capacity_all = self.trace.capacities(rnd, self.start_capacity) if self.trace else self.start_capacity
            capacity = [capacity_all[c] for c in sel]
            costs = self.predicted_times(sel, assignments, capacity)
            ranks = clientsmod.place(sel, costs, self.num_workers, self.clients.pinned)
            self.rank_capacity = self.rank_capacities(capacity_all)
            # 2. broadcast the plan, the masks (packed bits) and the global model
            plan = Plan(
                round=rnd, clients=tuple(int(c) for c in sel), ranks=tuple(int(r) for r in ranks),
                steps=tuple(a.steps for a in assignments), time_limit=tuple(a.time_limit for a in assignments),
                mu=tuple(a.mu for a in assignments), capacity=tuple(capacity),
                cursor=tuple(int(self.cursors[c]) for c in sel), rank_capacity=tuple(self.rank_capacity),
                balance=self.strategy.balance, weighting=self.strategy.weighting, **self.workers_evaluate(self.rank_capacity),
            )
            try:
                self.comm.bcast_obj(plan, timeout=cfg.run.round_timeout)
                self.comm.bcast_array(pack_masks(spec, masks), cfg.run.round_timeout, what=MASKS_BCAST)
                self.comm.bcast_array(self.flat, cfg.run.round_timeout)
            except RoundTimeout as exc:  # (or StopTimeout: stopping, and a worker does not answer)
                self.save_pending()
                raise type(exc)(f"round {rnd}: {exc}") from None
            if self.pending is not None:  # the last round's evaluation and checkpoint, overlapped
                self.finish_round(broadcast=False)
            # 3. collect the masked updates; drop late and non-finite ones; recover the global model
            idxs = [param_index(spec, m) for m in masks]
            stats, sums, accepted = self.collect(rnd, idxs, ranks, sel)
            self.flat = self.strategy.finish(self.flat, sums)
            if not np.all(np.isfinite(self.flat)):
                raise FloatingPointError(f"round {rnd}: the aggregated model is not finite")
            round_time = time.perf_counter() - t0
            self.root_busy = round_time - (self.comm.waited - waited0)  # rank 0's work in the round: not waiting
            self.root_cpu = time.process_time() - cpu0  # and the CPU it used (polling included)
            # 4. learn from the measured times; count which neurons were trained
            for i, c in enumerate(sel):
                self.strategy.observe(int(c), ratios[i], stats["step_time"][i])
                if accepted[i]:
                    for name, kept in masks[i].items():
                        self.coverage[name][kept] += 1
            self.cursors[sel] = stats["cursor"].astype(np.int64)
            busy_per_rank = np.bincount(ranks - 1, weights=stats["busy_time"], minlength=self.num_workers)
            self.eval_split.observe_training(float(busy_per_rank.max()))
            # 5. record; evaluate, report and checkpoint now, or while the workers train the next round
            keep = [keep_ratio(spec, m) for m in masks]
            self.record(rnd, round_time, stats, keep, masks, capacity, accepted, time.perf_counter() - t_run, sel, ranks)
            stopped_by = signals.requested() or ("SIGTERM" if stats["signal"].any() else None)
            self.pending = (rnd, round_time, keep, stats, bool(stopped_by))
            if rnd == cfg.run.rounds or stopped_by or not cfg.run.overlap_eval:
                self.finish_round()
            if stopped_by and rnd < cfg.run.rounds:
                print(
                    f"elfish-mpi: {stopped_by} received: stopped after round {rnd} with a checkpoint; "
                    f"continue with --resume {self.out}",
                    flush=True,
                )
                self.comm.bcast_obj(Plan.stop_message(), what=STOP_BCAST)
                return signals.EXIT_PREEMPTED
        self.comm.bcast_obj(Plan.stop_message(), what=STOP_BCAST)
        self.summary()
        return 0

    def predicted_times(self, sel, assignments, capacity) -> list[float]:
        """Each selected client's predicted training time, what placement balances: the
        planner's prediction where the strategy plans, else MACs x steps / capacity (relative)."""
        planner = self.strategy.planner
        if planner is not None:
            return [a.steps * planner.predict(int(c), a.ratios) for c, a in zip(sel, assignments)]
        return [a.steps * macs_fraction(self.spec, a.ratios) / cap for a, cap in zip(assignments, capacity)]

    def due(self, rnd: int) -> bool:
        """Whether round ``rnd``'s model is evaluated (by the round number alone: never timing)."""
        return rnd % self.cfg.run.eval_every == 0 or rnd == self.cfg.run.rounds

    def workers_evaluate(self, capacity) -> dict:
        """The plan's evaluation fields: the pending round and each worker's test chunks, when
        that round is due and the workers take part (rank 0 evaluates the rest meanwhile)."""
        self.eval_plan = None
        if self.pending is None or not self.due(self.pending[0]):
            return {}
        k0, ranges = self.eval_split.split(capacity, overlapped=True)
        if k0 == self.eval_split.k:
            return {}
        self.eval_plan = (k0, ranges)
        return {"evaluate": self.pending[0], "eval_chunks": ranges}

    def evaluate(self, rnd: int, broadcast: bool) -> None:
        """Round ``rnd``'s accuracy and loss, from every rank's test chunks: rank 0's here, the
        workers' as they send them. With ``broadcast``, the model first goes to the workers in an
        evaluation-only plan (when they take part); otherwise it went with the next round's plan.
        When a worker fails meanwhile, rank 0 evaluates every chunk itself (it holds the whole
        test set), so the round's figures are recorded all the same, and the failure goes on."""
        cfg = self.cfg
        t_eval = time.perf_counter()
        try:
            if broadcast:
                k0, ranges = self.eval_split.split(self.rank_capacity, overlapped=False)
                if k0 < self.eval_split.k:
                    plan = Plan.evaluate_only(rnd, ranges, tuple(self.rank_capacity))
                    self.comm.bcast_obj(plan, timeout=cfg.run.round_timeout, what=EVAL_BCAST)
                    self.comm.bcast_array(self.flat, cfg.run.round_timeout, what=EVAL_BCAST)
            else:
                k0, ranges = self.eval_plan if self.eval_plan is not None else (self.eval_split.k, ())
            per_chunk = np.zeros((self.eval_split.k, 2), dtype=np.float64)
            t_root = [0.0]

            def own_share() -> None:  # while the workers' results are on their way
                t = time.perf_counter()
                if k0 > 0:
                    per_chunk[:k0] = self.evaluate_chunk_range(0, k0)
                t_root[0] = time.perf_counter() - t

            bufs = {w: eval_buffer(r[1] - r[0]) for w, r in enumerate(ranges) if r[1] > r[0]}
            self.comm.recv_evals(bufs, cfg.run.round_timeout, meanwhile=own_share)
        except (RoundTimeout, RankFailure):
            self.evaluate_alone(t_eval)
            raise
        for w, buf in bufs.items():
            per_chunk[ranges[w][0] : ranges[w][1]] = buf[1:]
            if self.slots_are_ranks:  # (else a worker rank's time has no column of its own)
                self.workers["eval_time"][-1][w] = float(buf[0, 0])
        self.eval_split.observe(k0, t_root[0], self.eval_split.k - k0, max((float(b[0, 0]) for b in bufs.values()), default=0.0))
        self.record_evaluation(per_chunk, t_eval, k0, t_root[0])

    def evaluate_chunk_range(self, first: int, stop: int) -> np.ndarray:
        a, b = image_range(self.test_images, (first, stop))
        load_flat(self.model, self.flat)
        return evaluate_chunks(self.model, self.x_test[a:b], self.y_test[a:b])

    def evaluate_alone(self, t_eval: float) -> None:
        """Every chunk on rank 0 (the same figures, bit for bit): when a worker has failed."""
        t = time.perf_counter()
        per_chunk = self.evaluate_chunk_range(0, self.eval_split.k)
        self.record_evaluation(per_chunk, t_eval, self.eval_split.k, time.perf_counter() - t)

    def record_evaluation(self, per_chunk: np.ndarray, t_eval: float, k0: int, t_root: float) -> None:
        acc, loss = combine(per_chunk, self.test_images)
        self.metrics["test_accuracy"][-1], self.metrics["test_loss"][-1] = acc, loss
        self.metrics["eval_time"][-1] = time.perf_counter() - t_eval
        self.metrics["eval_root_share"][-1] = k0 / self.eval_split.k
        self.metrics["eval_root_time"][-1] = t_root

    def finish_round(self, broadcast: bool = True) -> None:
        """Evaluate the model of the pending round (if due), report it and checkpoint it (if
        due). Called right after the round (``broadcast``: the workers get the model in an
        evaluation-only plan), or during the next one, whose broadcast carried the model:
        either way the model, masks, coverage, cursors and planner are still that round's."""
        rnd, round_time, keep, stats, stopping = self.pending
        self.pending = None
        cfg = self.cfg
        try:
            if self.due(rnd):
                self.evaluate(rnd, broadcast)
        except (RoundTimeout, RankFailure) as exc:  # the round's checkpoint (evaluated by rank 0) still counts
            self.save(rnd)
            raise type(exc)(f"round {rnd}: evaluation: {exc}") from None
        self.report(rnd, self.metrics["test_accuracy"][-1], round_time, keep, stats)
        if rnd % cfg.checkpoint.every == 0 or rnd == cfg.run.rounds or stopping:
            self.save(rnd)
        else:
            self.write_csv()  # every round, so that a long job can be followed (tail -f metrics.csv)

    def save_pending(self) -> None:
        """Before the job ends on a failed round: the previous round's checkpoint, if its
        overlapped write had not happened yet (the model is still that round's; evaluated, when
        due, by rank 0 alone: the workers do not answer)."""
        if self.pending is not None:
            rnd = self.pending[0]
            self.pending = None
            try:
                if self.due(rnd):
                    self.evaluate_alone(time.perf_counter())
                self.save(rnd)
            except Exception as exc:  # the failure being reported matters more
                print(f"elfish-mpi: could not write the pending checkpoint: {exc}", file=sys.stderr, flush=True)

    def collect(self, rnd: int, idxs: list[np.ndarray], ranks: np.ndarray, sel: np.ndarray):
        """The records of the round's clients (slot i: client ``sel[i]`` on worker rank
        ``ranks[i]``), the round's sums of the accepted updates (folded by the strategy as they
        arrive, in client order) and which updates were accepted (in time, finite)."""
        sums = self.strategy.begin(self.flat.size)
        finite = np.ones(len(sel), dtype=bool)

        def arrived(i: int, record, values: np.ndarray) -> None:
            if int(record["client"]) != int(sel[i]):
                raise RankFailure(f"worker rank {ranks[i]} sent an update of client {int(record['client'])} for client {sel[i]}")
            finite[i] = bool(np.all(np.isfinite(values)))
            if finite[i] and not record["late"]:
                self.strategy.aggregate(sums, idxs[i], values, float(record["weight"]))

        try:
            stats, summed = receive(self.comm, self.cfg.strategy.transport, [int(r) for r in ranks], [len(i) for i in idxs],
                                    self.flat.size, self.cfg.run.round_timeout, arrived)
            if summed is not None and not np.array_equal(stats["client"].astype(np.int64), sel):
                raise RankFailure(f"the workers' records are of clients {stats['client'].astype(int).tolist()}, not {sel.tolist()}")
        except (RoundTimeout, RankFailure) as exc:
            self.save_pending()
            raise type(exc)(f"round {rnd}: {exc}") from None
        if summed is not None:  # reduce: the workers left out what does not count
            finite = stats["finite"] > 0
        accepted = finite & ~(stats["late"] > 0)
        if summed is not None:
            sums.add_sums(summed[0], summed[1], float(stats["weight"][accepted].sum()))
        for i in np.flatnonzero(~finite):
            which = "" if self.slots_are_ranks else f" (client {sel[i]})"
            print(f"elfish-mpi: round {rnd}: rejected the non-finite update of worker rank {ranks[i]}{which}", flush=True)
        return stats, sums, accepted

    # -- records -------------------------------------------------------------------------
    def record(self, rnd, round_time, stats, keep, masks, capacity, accepted, elapsed, sel, ranks) -> None:
        """One round's metrics, and a row per slot (client taking part) in /workers."""
        row = {
            "round": rnd,
            "round_time": round_time,
            "virtual_time": float(stats["virtual_time"].max()),
            "wall_clock": self.wall_offset + elapsed,
            "test_accuracy": float("nan"),  # filled in by finish_round where evaluated
            "test_loss": float("nan"),
            "train_loss": float(np.average(stats["train_loss"], weights=stats["num_samples"])),
            "updates_accepted": int(accepted.sum()),
            "eval_time": 0.0,
            "eval_root_share": float("nan"),  # filled in where evaluated
            "eval_root_time": float("nan"),
            "checkpoint_time": 0.0,
            "peak_memory": peak_memory(),
            "root_busy_time": self.root_busy,
            "root_cpu_time": self.root_cpu,
        }
        done = len(self.metrics.get("round", []))  # rounds recorded before (a key new since then: NaN there)
        for k, v in row.items():
            self.metrics.setdefault(k, [float("nan")] * done).append(v)
        per_worker = {
            "keep_ratio": keep,
            "compute_ratio": [compute_ratio(self.spec, m) for m in masks],
            "busy_time": stats["busy_time"],
            "idle_time": np.maximum(round_time - stats["busy_time"], 0.0),
            "virtual_time": stats["virtual_time"],
            "num_samples": stats["num_samples"],
            "step_time": stats["step_time"],
            "train_loss": stats["train_loss"],
            "weight": stats["weight"],
            "bytes_sent": stats["bytes_sent"],
            "capacity": capacity,
            "steps": stats["steps"],
            "dropped": stats["late"],
            "rejected": 1.0 - stats["finite"],
            "eval_time": np.zeros(len(sel)),  # filled in where evaluated (a rank's share of the test set), when slots are ranks
            "peak_memory": stats["peak_memory"],
            "bytes_received": stats["bytes_received"],
            "client": sel,
            "rank": ranks,
        }
        widths = self.spec.full_widths()
        for name in self.spec.maskable:  # the share kept (keep counts round up), not the ratio asked for
            per_worker[f"keep_ratio_{name}"] = [len(m[name]) / widths[name] for m in masks]
        earlier = {  # a checkpoint from before clients: one client a worker rank, all taking part
            "client": lambda: [float(c) for c in range(len(sel))], "rank": lambda: [float(c + 1) for c in range(len(sel))],
        }
        for k, v in per_worker.items():
            fill = earlier.get(k, lambda: [float("nan")] * len(sel))
            self.workers.setdefault(k, [fill() for _ in range(done)]).append([float(x) for x in v])
        self.masks[rnd] = masks

    def report(self, rnd, acc, round_time, keep, stats) -> None:
        acc_s = f"{acc:6.2%}" if np.isfinite(acc) else "   -  "
        if self.slots_are_ranks:
            keeps = "keep [" + " ".join(f"{k:.2f}" for k in keep) + "]"
        else:
            keeps = f"{len(keep)} clients, keep mean {np.mean(keep):.2f} min {np.min(keep):.2f}"
        dropped = int(stats["late"].sum())
        extra = f"  dropped {dropped}" if dropped else ""
        print(f"round {rnd:4d}/{self.cfg.run.rounds}  acc {acc_s}  time {round_time:7.3f}s  {keeps}{extra}", flush=True)

    def checkpoint(self, rnd: int) -> "ckptmod.Checkpoint":
        state = {"cursor": self.cursors.copy(), "client_speed": np.asarray(self.start_capacity, dtype=np.float64)}
        if self.quota_correction is not None:  # (this start's; a resumed run measures its own)
            state["quota_correction"] = self.quota_correction.copy()
        if self.strategy.planner is not None:
            state.update(self.strategy.planner.state())
        return ckptmod.Checkpoint(
            round=rnd,
            config=self.cfg.to_dict(),
            strategy=self.cfg.strategy.name,
            model=state_dict_from_flat(self.spec, self.flat),
            metrics={k: np.asarray(v, dtype=np.float64 if k != "round" else np.int64) for k, v in self.metrics.items()},
            workers={k: np.asarray(v, dtype=np.float64) for k, v in self.workers.items()},
            masks=self.masks,
            coverage=self.coverage,
            profiles=self.profiles,
            state=state,
            attrs={"num_workers": self.num_workers, "model": self.spec.name, "groups": ",".join(self.spec.maskable),
                   **provenance.as_attrs(self.setup.get("provenance", {}))},
        )

    def save(self, rnd: int) -> None:
        ck = self.checkpoint(rnd)  # the file records its own writing time in checkpoint_time
        ckptmod.rotate(self.out, ck, self.cfg.checkpoint.keep, timed="checkpoint_time")
        self.metrics["checkpoint_time"][-1] = float(ck.metrics["checkpoint_time"][-1])
        self.write_csv()

    def write_csv(self) -> None:
        names = list(self.metrics)
        buf = io.StringIO()
        w = csv.writer(buf)
        if self.slots_are_ranks:  # a column per worker
            keep_cols = [f"keep_ratio_w{i + 1}" for i in range(self.num_workers)]
            keep_of = lambda row: [f"{k:.4f}" for k in row]  # noqa: E731
        else:  # the round's clients change: their mean and least
            keep_cols = ["keep_ratio_mean", "keep_ratio_min"]
            keep_of = lambda row: [f"{np.mean(row):.4f}", f"{np.min(row):.4f}"]  # noqa: E731
        w.writerow(names + keep_cols)
        for i in range(len(self.metrics["round"])):
            w.writerow([self.metrics[n][i] for n in names] + keep_of(self.workers["keep_ratio"][i]))
        ckptmod.write_text_atomic(self.out / "metrics.csv", buf.getvalue())

    def summary(self) -> None:
        m = self.metrics
        if not m.get("round"):
            return
        rt = np.asarray(m["round_time"][self.start_round :] or m["round_time"])
        acc = [a for a in m["test_accuracy"] if np.isfinite(a)]
        final = f"{acc[-1]:.2%}" if acc else "not evaluated"
        keep = np.asarray(self.workers["keep_ratio"])
        if self.slots_are_ranks:
            keeps = f"mean keep ratio per worker [{' '.join(f'{k:.2f}' for k in keep.mean(axis=0))}]"
        else:
            keeps = f"mean keep ratio {keep.mean():.2f} over {keep.size} client updates"
        print(
            f"done: {m['round'][-1]} rounds, final accuracy {final}, median round time {np.median(rt):.3f}s, "
            f"{keeps}, checkpoint {self.out / 'checkpoint.h5'}",
            flush=True,
        )
        sys.stdout.flush()
