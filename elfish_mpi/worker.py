"""Ranks >= 1: profile once, then each round receive (plan, masks, model), train the clients
placed here, send a (record, update) per client; the messages are declared in protocol.py."""
from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch.nn import functional as F

from . import data as datamod
from .data import Sampler  # (the mini-batch order; importable from here as before)
from . import evaluation, profiling, signals, supervisor, transport
from .comm import Comm
from .config import Config
from .clients import rank_capacities
from .masking import keep_ratio, make_masks
from .protocol import Plan, Task, eval_buffer, mask_buffer, new_update, peak_memory, unpack_masks
from .models import ModelSpec
from .optim import SGD
from .aggregation import worker_weight
from .submodel import build_submodel, flat_params, full_model, load_flat, num_params
from .throttle import Throttle, quota_corrections


def parse_fault(text: str) -> set[tuple[int, int]]:
    """``"RANK:ROUND[,RANK:ROUND...]"`` -> {(rank, round)}: where a test injects a NaN update."""
    out = set()
    for item in filter(None, (t.strip() for t in text.split(","))):
        rank, rnd = item.split(":")
        out.add((int(rank), int(rnd)))
    return out


def train_step(model, opt, x, y, anchor=None, mu: float = 0.0) -> float:
    """One SGD step; with ``anchor`` (the round's starting parameters) and ``mu`` > 0 the
    loss carries FedProx's proximal term mu/2 * ||w - anchor||^2."""
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    if anchor is not None and mu > 0:
        loss = loss + 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
    loss.backward()
    opt.step()
    return float(loss.detach())


MATCH_WINDOW_MAX = 60.0  # seconds: the longest the quota matching runs unless workers.match_seconds asks more


def match_quotas(comm: Comm, throttle: Throttle | None, step, capacities, seconds: float) -> np.ndarray:
    """Measure, on every worker at once, the CPU a full-model step takes under its quota, and
    scale each worker's quota by its CPU per step over the full-speed workers'
    (:func:`throttle.quota_corrections`). Every rank calls it (rank 0 with ``throttle`` None
    and ``step`` None); ``capacities`` are the workers'. One untimed and one timed step set
    the window: ``seconds``, or three of the slowest worker's steps if longer (at most
    :data:`MATCH_WINDOW_MAX` unless ``seconds`` is longer); every worker
    steps until the window has passed, so all measure under the same load. Returns the
    corrections on rank 0, this worker's (1 element) elsewhere."""
    with torch.random.fork_rng(devices=[]):  # (the steps leave torch's random state as it was)
        t = 0.0
        if throttle is not None:
            step()
            w0 = time.perf_counter()
            step()
            t = time.perf_counter() - w0
        rows = comm.gather_rows(np.array([t]))
        window = None
        if comm.rank == 0:
            window = min(max(float(seconds), 3.0 * float(rows[1:, 0].max())), max(float(seconds), MATCH_WINDOW_MAX))
            print(f"elfish-mpi: matching the cgroup quotas: every worker trains the full model for {window:.1f} s",
                  flush=True)
        window = comm.bcast_obj(window, what="the broadcast of the quota matching's window (a worker rank stopped answering)")
        cpu = 0.0
        if throttle is not None:
            n, w0, c0 = 0, time.perf_counter(), time.process_time()
            while n == 0 or time.perf_counter() - w0 < window:
                step()
                n += 1
            cpu = (time.process_time() - c0) / n
    rows = comm.gather_rows(np.array([cpu]))
    corr = np.empty(comm.size - 1)
    if comm.rank == 0:
        corr[:] = quota_corrections(rows[1:, 0], capacities)
    comm.bcast_array(corr, what="the broadcast of the quota corrections (a worker rank stopped answering)")
    if throttle is not None:
        throttle.correct(corr[comm.rank - 1])
        return corr[comm.rank - 1:comm.rank]
    return corr


class Worker:
    """A worker rank: trains the clients rank 0 places on it (always the same one when each
    client is pinned to its rank), one after another, each from the round's global model."""

    def __init__(self, comm: Comm, cfg: Config, spec: ModelSpec, setup: dict, peers: list[int]):
        self.comm, self.cfg, self.spec = comm, cfg, spec
        self.index = comm.rank - 1
        num_workers = comm.size - 1
        self.speeds = list(setup["speeds"])  # each client's starting capacity (clients.py)
        self.matches_quotas = bool(setup.get("match_quotas", False))  # (cgroup: Aggregator.run matches with it)
        self.pinned = cfg.pinned(num_workers)
        # pinned: the rank is its client's device (profiled and evaluating at its capacity);
        # otherwise a host of clients at full speed, slowed to each client's while it trains it
        rank_caps = rank_capacities(self.speeds, num_workers)
        self.throttle = Throttle(rank_caps[self.index], cfg.workers.throttle)
        d = cfg.data
        self.parts = datamod.ClientParts(
            d.name, setup["data_path"], len(self.speeds), d.partition, cfg.run.seed,
            alpha=d.alpha, shards_per_worker=d.shards_per_worker, max_samples=d.max_samples,
        )
        if self.pinned:
            self.parts.load([self.index])  # its one client's data, at start-up
        self.flat = np.empty(num_params(spec), dtype=np.float32)
        # the test set, for the chunks of it rank 0 asks this worker to evaluate (evaluation.py)
        self.test = self.eval_model = None
        if cfg.run.eval_on == "all":  # (the whole test set as uint8: rank 0 may ask for any chunk)
            self.test = datamod.load_test_data(d.name, setup["data_path"], d.test_samples)
            if len(self.test.labels) != setup["test_images"]:
                raise datamod.DataError(
                    f"{setup['data_path']}: this rank's test set has {len(self.test.labels)} images, "
                    f"rank 0's {setup['test_images']} (is the data set the same on every node?)"
                )
            self.eval_model = full_model(spec)
        self.inject_nan = parse_fault(os.environ.get("ELFISH_FAULT_NAN", ""))
        local = [r - 1 for r in peers if r > 0]  # the workers that share this one's cores (Comm.core_peers)
        self.throttle.attach(
            worker=self.index, num_workers=num_workers, job_id=setup["job_id"], capacities=rank_caps,
            local_workers=local, threads=cfg.run.threads,
        )

    @staticmethod
    def batch(images: np.ndarray, idx: np.ndarray) -> torch.Tensor:
        """The float32 images of ``idx`` (the same values as normalizing the whole set first)."""
        return torch.from_numpy(datamod.normalize(images[idx]))

    def full_step(self):
        """A training step of the full model on this rank's client's data, for match_quotas."""
        with torch.random.fork_rng(devices=[]):  # (leaves torch's random state as it was)
            torch.manual_seed(self.cfg.run.seed)
            model = self.spec.init_module()
        opt = SGD(model.parameters(), lr=self.cfg.train.lr)
        part = self.parts.client(self.index)
        y = torch.from_numpy(part.labels.astype(np.int64))
        probe = Sampler(len(y), self.cfg.train.batch_size, self.cfg.run.seed + 2, self.index)

        def step():
            idx = probe.next()
            train_step(model, opt, self.batch(part.images, idx), y[idx])
        return step

    # -- profiling -------------------------------------------------------------
    def profile(self) -> np.ndarray:
        """Time training steps at every profiling configuration under this rank's throttle, on
        its client's data (pinned), or otherwise on the data of the client with the most samples
        (the cost of a step does not depend on whose images it trains on, but a client with fewer
        images than a batch would time smaller batches)."""
        kind = self.cfg.strategy.profile
        configs = profiling.configurations(self.spec, kind)
        torch.manual_seed(self.cfg.run.seed)
        base = flat_params(self.spec.init_module())
        part = self.parts.client(self.index if self.pinned else max(range(len(self.parts)), key=self.parts.size))
        images, y = part.images, torch.from_numpy(part.labels.astype(np.int64))
        probe = Sampler(len(y), self.cfg.train.batch_size, self.cfg.run.seed + 1, self.index)
        models, samples = [], [[] for _ in configs]
        for row in configs:
            ratios = profiling.ratios_of(self.spec, row)
            kept = make_masks(self.spec, ratios, "ordered", seed=0, round=0, worker=self.index)
            model, _ = build_submodel(self.spec, kept, base)
            models.append((model, SGD(model.parameters(), lr=self.cfg.train.lr)))
        # (layers:) two passes over all configurations, so that a burst of load on the machine
        # spreads over them instead of falling on one; a warm-up step before each timing.
        for _ in range(profiling.passes(kind)):
            for i, (model, opt) in enumerate(models):
                idx = probe.next()
                train_step(model, opt, self.batch(images, idx), y[idx])
                for _ in range(self.cfg.strategy.profile_steps):
                    idx = probe.next()
                    _, t = self.throttle.run(train_step, model, opt, self.batch(images, idx), y[idx])
                    samples[i].append(t.reported)
        return np.array([float(np.median(s)) for s in samples])  # (rank 0 adds each configuration's costs)

    # -- evaluation ------------------------------------------------------------
    def evaluate_share(self, chunks: tuple[int, int]) -> np.ndarray:
        """Evaluate the global model just received on the test ``chunks`` (under this worker's
        throttle: a slow device evaluates slowly too); the :func:`protocol.eval_buffer`."""
        t0 = time.perf_counter()
        buf = eval_buffer(chunks[1] - chunks[0])
        a, b = evaluation.image_range(len(self.test.labels), chunks)
        x = torch.from_numpy(datamod.normalize(self.test.images[a:b]))
        y = torch.from_numpy(self.test.labels[a:b].astype(np.int64))
        load_flat(self.eval_model, self.flat)
        buf[1:], _ = self.throttle.run(evaluation.evaluate_chunks, self.eval_model, x, y)
        buf[0, 0] = time.perf_counter() - t0
        return buf

    # -- one client in a round ----------------------------------------------------
    def train_client(self, rnd: int, kept: dict, task: Task, received: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Train client ``task.client``'s sub-network of ``kept`` from the global model as
        ``task`` says, on its data from its data position; (UPDATE record, payload)."""
        t_start = time.perf_counter()
        part = self.parts.client(task.client)
        images, y = part.images, torch.from_numpy(part.labels.astype(np.int64))
        sampler = Sampler(len(y), self.cfg.train.batch_size, self.cfg.run.seed, task.client, task.cursor)
        model, idx = build_submodel(self.spec, kept, self.flat)
        start = self.flat[idx]
        opt = SGD(model.parameters(), lr=self.cfg.train.lr, momentum=self.cfg.train.momentum)
        anchor = [p.detach().clone() for p in model.parameters()] if task.mu > 0 else None
        reported = virtual = loss_sum = 0.0
        steps, late = 0, False
        for _ in range(task.steps):
            if task.time_limit and reported >= task.time_limit:
                late = True  # out of time: stop here; the update is dropped
                break
            b = sampler.next()
            loss, t = self.throttle.run(train_step, model, opt, self.batch(images, b), y[b], anchor, task.mu)
            reported += t.reported
            virtual += t.virtual
            loss_sum += loss
            steps += 1
        late = late or bool(task.time_limit and reported > task.time_limit)
        delta = flat_params(model) - start
        if (self.index + 1, rnd) in self.inject_nan:
            delta[::7] = np.nan  # fault injection for tests (ELFISH_FAULT_NAN)
        finite = bool(np.all(np.isfinite(delta)))
        weight = worker_weight(len(y), keep_ratio(self.spec, kept), task.balance, task.weighting)
        data = transport.payload(self.cfg.strategy.transport, self.flat.size, idx, delta, weight, finite and not late)
        record = new_update(
            client=task.client, step_time=reported / max(steps, 1), virtual_time=virtual, num_samples=len(y),
            train_loss=loss_sum / max(steps, 1), steps=steps, cursor=sampler.cursor, weight=weight,
            late=float(late), finite=float(finite), signal=float(signals.requested() is not None),
            bytes_sent=data.nbytes, busy_time=time.perf_counter() - t_start, peak_memory=peak_memory(),
            bytes_received=received,
        )
        return record, data

    def run(self, do_profile: bool) -> None:
        rank = self.comm.rank
        try:
            self.comm.barrier()  # every worker starts (timing) at once, under the same load
            if self.matches_quotas:
                supervisor.note("while matching the cgroup quotas")
                match_quotas(self.comm, self.throttle, self.full_step(), self.throttle.capacities,
                             self.cfg.workers.match_seconds)
            if do_profile:
                supervisor.note("while profiling")
                self.comm.gather_rows(self.profile())
            received = self.comm.received
            while True:
                plan: Plan = self.comm.bcast_obj(None)
                if plan.stop:
                    return
                supervisor.note(f"in round {plan.round}")
                masks = mask_buffer(self.spec, len(plan.clients))
                if plan.train:
                    self.comm.bcast_array(masks)
                self.comm.bcast_array(self.flat)
                if plan.rank_capacity[self.index] != self.throttle.capacity:  # (before evaluating: rank 0 split by it)
                    self.throttle.set_capacity(plan.rank_capacity[self.index], capacities=list(plan.rank_capacity))
                chunks = plan.eval_chunks[self.index] if plan.evaluate else (0, 0)
                if chunks[1] > chunks[0]:
                    self.comm.send_eval(self.evaluate_share(chunks))
                if not plan.train:
                    continue  # (the evaluation-only broadcast counts towards the next round's bytes)
                slots = plan.slots_of(rank)
                self.parts.load(plan.clients[i] for i in slots)  # clients new to this rank: one read
                outbox = transport.Outbox(self.comm, self.cfg.strategy.transport, self.flat.size, self.cfg.run.round_timeout)
                for slot in slots:
                    task = plan.task(slot)
                    if task.capacity != self.throttle.capacity:
                        self.throttle.set_capacity(task.capacity, capacities=list(plan.rank_capacity))
                    record, data = self.train_client(plan.round, unpack_masks(self.spec, masks, slot), task,
                                                     received=self.comm.received - received)
                    received = self.comm.received
                    outbox.send(record, data)
                outbox.close()
                received = self.comm.received  # (a rank without a client this round starts afresh)
                done = {0: "with no client in round", 1: "after its update of round"}.get(len(slots), "after its updates of round")
                supervisor.note(f"{done} {plan.round}, before round {plan.round + 1}'s plan arrived")
        finally:
            self.throttle.detach()
