"""Run configuration: TOML files plus ``--set section.key=value`` overrides.

One keyword-only dataclass per concern, each validated in ``__post_init__`` with a
:class:`ConfigError` that names the key and the allowed values. ``Config.describe()``
renders every key with its default and documentation (used by ``--help`` and the README).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range."""


def _doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} = {value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _positive_int(key: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} = {value!r} must be an integer >= {minimum}")


def _number(key: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> None:
    try:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an integer beyond the float range
        ok = False
    if ok:
        ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise ConfigError(f"{key} = {value!r} must be a number in {bracket}{lo}, {hi}]")


EVAL_ON = ("all", "root")
PROFILE_KINDS = ("layers", "quick")  # profiling.PROFILES


@dataclass(kw_only=True)
class RunConfig:
    rounds: int = _doc("Number of federated rounds to run (in total, counting rounds restored by --resume).", 20)
    seed: int = _doc("Seed for model initialisation, data partition, masks and data order.", 0)
    out: str = _doc("Run directory: checkpoint.h5, checkpoints/round-NNNNNN.h5, metrics.csv.", "runs/elfish")
    round_timeout: float = _doc("Seconds rank 0 waits for the workers' updates in one round before ending the job.", 600.0)
    stop_grace: float = _doc(
        "After SIGTERM, seconds a wait of rank 0 may still last (from the signal, or from the wait's "
        "start if later); past that the job stops without the round under way (its last checkpoint "
        "kept, exit 75). Keep it below SLURM's KillWait. SIGUSR1 has no such limit.",
        20.0,
    )
    eval_every: int = _doc("Evaluate the global model on the test set every this many rounds (and at the last).", 1)
    threads: int = _doc(
        "torch intra-op threads per rank (several ranks usually share the cores). Left out of the "
        "config file and --set: $SLURM_CPUS_PER_TASK when set (sbatch/srun --cpus-per-task), else 1.",
        1,
    )
    overlap_eval: bool = _doc(
        "Evaluate round r's model and write its checkpoint during round r+1: its model goes out with round "
        "r+1's plan, the ranks evaluate their shares of the test set (workers before training) and rank 0 "
        "writes the file while the workers train (the last round and a stop are finished at once; false: "
        "before round r+1 starts).",
        True,
    )
    eval_on: str = _doc(
        "Which ranks evaluate the global model: all (rank 0 evaluates the test chunks it can while the "
        "workers train, the workers the rest before they train, in proportion to capacity; the split "
        "follows the measured rates, recorded in /metrics/eval_root_share), or root (rank 0 alone). "
        "The figures are the same bit for bit either way (on ranks with the same CPU and torch build).",
        "all",
    )

    def __post_init__(self) -> None:
        _positive_int("run.rounds", self.rounds)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"run.seed = {self.seed!r} must be an integer >= 0")
        if not isinstance(self.out, str) or not self.out.strip():
            raise ConfigError("run.out must be a non-empty path")
        _number("run.round_timeout", self.round_timeout, 0.0, 1e7, lo_open=True)
        _number("run.stop_grace", self.stop_grace, 0.0, 1e7, lo_open=True)
        _positive_int("run.eval_every", self.eval_every)
        _positive_int("run.threads", self.threads)
        if not isinstance(self.overlap_eval, bool):
            raise ConfigError(f"run.overlap_eval = {self.overlap_eval!r} must be true or false")
        _choice("run.eval_on", self.eval_on, EVAL_ON)


DATA_NAMES = ("fashion-mnist", "mnist", "femnist", "cifar10", "npz")
PARTITIONS = ("iid", "dirichlet", "shards", "natural")


@dataclass(kw_only=True)
class DataConfig:
    name: str = _doc("Data set: " + ", ".join(DATA_NAMES) + ".", "fashion-mnist")
    path: str = _doc("File or directory of the data set; empty: look in the standard places (see data/README.md).", "")
    partition: str = _doc("How training data is split over the clients (one per worker rank unless clients.count says otherwise): " + ", ".join(PARTITIONS) + ".", "iid")
    alpha: float = _doc("Dirichlet concentration for partition = dirichlet (smaller: more label skew).", 0.5)
    shards_per_worker: int = _doc("Shards per client for partition = shards.", 2)
    max_samples: int = _doc("Cap on each client's training samples (0: all of its partition).", 0)
    test_samples: int = _doc("Test samples the global model is evaluated on: the first this many of the test split (0: all of it; a split stored in class order, as the CIFAR-10 npz, is taken in a fixed shuffled order).", 0)

    def __post_init__(self) -> None:
        _choice("data.name", self.name, DATA_NAMES)
        if not isinstance(self.path, str):
            raise ConfigError("data.path must be a string")
        _choice("data.partition", self.partition, PARTITIONS)
        _number("data.alpha", self.alpha, 0.0, 1e6, lo_open=True)
        _positive_int("data.shards_per_worker", self.shards_per_worker)
        _positive_int("data.max_samples", self.max_samples, 0)
        _positive_int("data.test_samples", self.test_samples, 0)
        if self.name == "npz" and not self.path:
            raise ConfigError("data.name = 'npz' needs data.path pointing at the .npz file")


MODEL_NAMES = ("lenet", "alexnet", "cnn-femnist", "resnet18", "vit-tiny")  # models.MODELS
NORMS = ("static-bn", "group", "none")  # models.NORMS


@dataclass(kw_only=True)
class ModelConfig:
    name: str = _doc(
        "Model: lenet (CNN for 28x28 grey images), alexnet (AlexNet-style CNN for 32x32 RGB, CIFAR-10), "
        "cnn-femnist (LEAF's FEMNIST CNN), resnet18 (pre-activation ResNet-18 for 32x32 images, HeteroFL's), "
        "vit-tiny (a small vision transformer for 28x28 or 32x32 images), or package.module:factory "
        "(your own model and its neuron groups; see the README).",
        "lenet",
    )
    norm: str = _doc(
        "resnet18's normalization: static-bn (BatchNorm without running statistics, HeteroFL's sBN), "
        "group (GroupNorm, 16 channels a group) or none.",
        "static-bn",
    )

    def __post_init__(self) -> None:
        own = isinstance(self.name, str) and ":" in self.name and all(self.name.partition(":")[::2])
        if not own and self.name not in MODEL_NAMES:
            raise ConfigError(f"model.name = {self.name!r} is not allowed; choose one of: {', '.join(MODEL_NAMES)}, or package.module:factory")
        _choice("model.norm", self.norm, NORMS)


@dataclass(kw_only=True)
class TrainConfig:
    local_steps: int = _doc("SGD steps each worker takes per round.", 10)
    batch_size: int = _doc("Mini-batch size of local training.", 32)
    lr: float = _doc("Learning rate of local SGD.", 0.05)
    momentum: float = _doc("SGD momentum within a round (the buffer starts from zero each round).", 0.0)

    def __post_init__(self) -> None:
        _positive_int("train.local_steps", self.local_steps)
        _positive_int("train.batch_size", self.batch_size)
        _number("train.lr", self.lr, 0.0, 100.0, lo_open=True)
        _number("train.momentum", self.momentum, 0.0, 0.999)


THROTTLES = ("sleep", "virtual", "none", "cgroup", "affinity")

# Named fleets: capacities per worker, repeated cyclically when the job has more workers.
FLEETS = {
    "uniform": [1.0],
    # ELFISH's testbed: Jetson Nano, AWS DeepLens and Raspberry Pi take 16, 80 and 30
    # minutes per training cycle (Xu et al. 2019), so capacities 16/16, 16/80, 16/30.
    "paper": [1.0, 0.2, 0.533],
    "quickstart": [1.0, 1.0, 0.5, 0.25],
    "one-straggler": [1.0, 1.0, 1.0, 0.25],
    "tiers": [1.0, 0.5, 0.25],
}


@dataclass(kw_only=True)
class WorkersConfig:
    capacity: list = _doc(
        "Relative speed (capacity, 1.0 = full speed) of each client; one value per client: with the default "
        "one client per worker rank, as many as the ranks minus one. Empty: workers.fleet, clients.speed, else all 1.0.",
        factory=list,
    )
    fleet: str = _doc(
        "A named fleet instead of a capacity list: " + ", ".join(FLEETS) + " (repeated over the clients); "
        "paper = Jetson Nano, AWS DeepLens, Raspberry Pi (1, 0.2, 0.533).",
        "",
    )
    trace: str = _doc(
        "CSV of capacities over time: a header 'round,w1,...,wN', then rows 'R,c1,...,cN'; from round R on "
        "(until the next row) client i runs at capacity ci (a column a client). Empty: capacities stay fixed.",
        "",
    )
    throttle: str = _doc(
        "How a capacity below 1 is enforced: sleep (sleep after each step so wall time = compute / capacity), "
        "virtual (no sleeping; reported times are CPU time / capacity), cgroup (a CPU quota per worker: cgroup v2 "
        "cpu.max or v1 cpu.cfs_quota_us), affinity (each worker pinned to a share of the cores), "
        "none (real heterogeneity of the machines).",
        "sleep",
    )
    match_seconds: float = _doc(
        "cgroup throttle: at start-up every worker trains the full model for this many seconds (or three of "
        "the slowest worker's steps if longer), all at once, and each quota is scaled by the CPU a step took "
        "that worker over what it took the full-speed workers (a slowed worker can need more CPU for the same "
        "step, and cores can differ in speed). 0: quotas as computed, not matched.",
        2.0,
    )

    @property
    def matches_quotas(self) -> bool:
        """Whether the job measures and scales the workers' cgroup quotas at start-up."""
        return self.throttle == "cgroup" and self.match_seconds > 0

    def __post_init__(self) -> None:
        _number("workers.match_seconds", self.match_seconds, 0.0, 600.0)
        self.match_seconds = float(self.match_seconds)
        if not isinstance(self.capacity, list):
            raise ConfigError(f"workers.capacity = {self.capacity!r} must be a list of numbers in (0, 1]")
        for i, c in enumerate(self.capacity):
            _number(f"workers.capacity[{i}]", c, 0.0, 1.0, lo_open=True)
        self.capacity = [float(c) for c in self.capacity]
        if self.fleet != "":
            _choice("workers.fleet", self.fleet, tuple(FLEETS))
            if self.capacity:
                raise ConfigError("give either workers.capacity or workers.fleet, not both")
        if not isinstance(self.trace, str):
            raise ConfigError("workers.trace must be a path (string)")
        _choice("workers.throttle", self.throttle, THROTTLES)


SELECTIONS = ("uniform",)
SPEEDS = ("", "lognormal", "tiers")  # or a path to a CSV table of device speeds (clients.py)


@dataclass(kw_only=True)
class ClientsConfig:
    count: int = _doc(
        "Number of clients (devices with their own data and speed). 0: one client per worker rank, each "
        "always trained by its own rank (the default; the real throttles need it). More clients than "
        "worker ranks: each round rank 0 places the selected clients on the ranks, which train theirs one after another.",
        0,
    )
    per_round: int = _doc("Clients taking part in each round (0: all of them).", 0)
    selection: str = _doc(
        "How a round's clients are chosen: uniform (per_round of them uniformly at random without "
        "replacement, drawn from run.seed and the round number alone, so a resumed run draws the same).",
        "uniform",
    )
    speed: str = _doc(
        "Each client's relative speed (capacity, 1 = the fastest): empty (workers.capacity, one value a "
        "client, or workers.fleet repeated over the clients), lognormal (exp(N(0, clients.sigma)) drawn "
        "from run.seed, divided by the largest draw), tiers (each client draws one of the tiers fleet's "
        "1, 0.5, 0.25), or the path of a CSV table of devices (header device,speed; each client draws a "
        "device uniformly, capacity = its speed over the table's largest; see launch/devices/).",
        "",
    )
    sigma: float = _doc("Spread of clients.speed = lognormal (the standard deviation of the log of a speed).", 0.5)

    def __post_init__(self) -> None:
        _positive_int("clients.count", self.count, 0)
        _positive_int("clients.per_round", self.per_round, 0)
        _choice("clients.selection", self.selection, SELECTIONS)
        if not isinstance(self.speed, str):
            raise ConfigError(f"clients.speed = {self.speed!r} must be lognormal, tiers, the path of a CSV file, or empty")
        if self.speed not in SPEEDS and not self.speed.endswith(".csv"):
            raise ConfigError(
                f"clients.speed = {self.speed!r} is not allowed; choose one of: lognormal, tiers, a path ending in .csv, "
                "or leave it empty (workers.capacity / workers.fleet)"
            )
        _number("clients.sigma", self.sigma, 0.0, 10.0, lo_open=True)
        if self.count and self.per_round > self.count:
            raise ConfigError(f"clients.per_round = {self.per_round} is more than clients.count = {self.count}")


STRATEGIES = ("fedavg", "fedavg-drop", "fedprox-partial", "heterofl", "fedrolex", "elfish")
AGGREGATIONS = ("balanced", "naive")
MASK_POLICIES = ("random", "rolling", "ordered")
TRANSPORTS = ("gather", "reduce")
WEIGHTINGS = ("auto", "samples", "count")
FALLBACKS = ("steps", "none")


@dataclass(kw_only=True)
class StrategyConfig:
    name: str = _doc(
        "fedavg (full model everywhere, waits for all), fedavg-drop (round deadline, late updates dropped), "
        "fedprox-partial (full model, stragglers take fewer steps, proximal term), heterofl (static nested widths), "
        "fedrolex (rolling window of neurons), elfish (profile-guided per-group masks, dynamic masking).",
        "elfish",
    )
    aggregation: str = _doc(
        "balanced (each parameter averaged over the workers that trained it) or naive (masked parameters count as zero updates).",
        "balanced",
    )
    mask_policy: str = _doc(
        "Which neurons a soft-training worker keeps: random (a fresh random set every round), "
        "rolling (a window that moves every round), ordered (always the first k).",
        "random",
    )
    min_keep: float = _doc("Smallest keep ratio the planner may give a neuron group.", 0.25)
    keep_ratios: list = _doc("Fixed keep ratio per client (overrides planning); empty: planned from the profiles.", factory=list)
    deadline: float = _doc(
        "Round deadline in seconds of training, the same for every strategy that has one (elfish, heterofl and fedrolex "
        "plan to meet it, fedprox-partial fits its steps into it, fedavg-drop drops an update that misses it); "
        "0: the fastest client's predicted full-model round time plus 10%.",
        0.0,
    )
    balance: float = _doc(
        "Balancing exponent b of elfish's aggregation: a worker's weight is num_samples * keep_ratio**b "
        "(1 * keep_ratio**b with strategy.weighting = count), "
        "so soft-trained updates count less (b > 0) or as much as full ones (b = 0).",
        0.5,
    )
    weighting: str = _doc(
        "What a worker's update weighs before the balance factor: samples (its number of training samples), "
        "count (1: each element averaged over the workers that trained it, as HeteroFL's and FedRolex's code do), "
        "auto (count for heterofl and fedrolex, samples for the others).",
        "auto",
    )
    replan: bool = _doc("Re-plan every round from the measured round times (elfish).", True)
    fallback: str = _doc(
        "When a worker with every group at min_keep is still predicted to miss the round deadline (elfish): "
        "steps (it takes only the local steps that fit; recorded in /workers/steps) or none (pure ELFISH: "
        "it takes every step and the round waits for it).",
        "steps",
    )
    mu: float = _doc("Proximal coefficient of fedprox-partial: the local loss gains mu/2 * ||w - w_global||^2.", 0.01)
    profile_steps: int = _doc("Training steps timed per keep-ratio configuration at start-up.", 3)
    profile: str = _doc(
        "What workers profile at start-up: layers (the whole model at keep 1, 0.75, 0.5, 0.25 and each "
        "neuron group alone at 0.5, two timing passes) or quick (the whole model at 1 and 0.25, one "
        "pass: the two points of the affine cost model, for many ranks on few cores; the rounds refine it).",
        "layers",
    )
    transport: str = _doc("How updates reach rank 0: gather (each worker sends only its kept values) or reduce (an MPI sum of dense weighted updates and coverage).", "gather")

    def __post_init__(self) -> None:
        _choice("strategy.name", self.name, STRATEGIES)
        _choice("strategy.aggregation", self.aggregation, AGGREGATIONS)
        _choice("strategy.mask_policy", self.mask_policy, MASK_POLICIES)
        _number("strategy.min_keep", self.min_keep, 0.0, 1.0, lo_open=True)
        if not isinstance(self.keep_ratios, list):
            raise ConfigError(f"strategy.keep_ratios = {self.keep_ratios!r} must be a list of numbers in (0, 1]")
        for i, r in enumerate(self.keep_ratios):
            _number(f"strategy.keep_ratios[{i}]", r, 0.0, 1.0, lo_open=True)
        self.keep_ratios = [float(r) for r in self.keep_ratios]
        _number("strategy.deadline", self.deadline, 0.0, 1e7)
        _number("strategy.balance", self.balance, 0.0, 10.0)
        _choice("strategy.weighting", self.weighting, WEIGHTINGS)
        _choice("strategy.fallback", self.fallback, FALLBACKS)
        if not isinstance(self.replan, bool):
            raise ConfigError(f"strategy.replan = {self.replan!r} must be true or false")
        _positive_int("strategy.profile_steps", self.profile_steps)
        _choice("strategy.profile", self.profile, PROFILE_KINDS)
        _number("strategy.mu", self.mu, 0.0, 1e3)
        _choice("strategy.transport", self.transport, TRANSPORTS)


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = _doc("Write a checkpoint every this many rounds (and always after the last round).", 5)
    keep: int = _doc("How many checkpoints to keep under checkpoints/ (0: all).", 3)

    def __post_init__(self) -> None:
        _positive_int("checkpoint.every", self.every)
        _positive_int("checkpoint.keep", self.keep, 0)


SECTIONS = {
    "run": RunConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "workers": WorkersConfig,
    "clients": ClientsConfig,
    "strategy": StrategyConfig,
    "checkpoint": CheckpointConfig,
}


@dataclass(kw_only=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    # -- construction -------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict) -> "Config":
        if not isinstance(raw, dict):
            raise ConfigError("the configuration must be a table of sections")
        unknown = sorted(set(raw) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown section(s) {', '.join(unknown)}; allowed: {', '.join(SECTIONS)}")
        parts = {}
        for name, section_cls in SECTIONS.items():
            values = raw.get(name, {})
            if not isinstance(values, dict):
                raise ConfigError(f"[{name}] must be a table of keys")
            allowed = [f.name for f in fields(section_cls)]
            bad = sorted(set(values) - set(allowed))
            if bad:
                raise ConfigError(
                    f"unknown key(s) {', '.join(name + '.' + b for b in bad)}; allowed in [{name}]: {', '.join(allowed)}"
                )
            parts[name] = section_cls(**values)
        return cls(**parts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    # -- checks that need the world size ------------------------------------
    def num_clients(self, num_workers: int) -> int:
        """How many clients the job has: clients.count, or one per worker rank."""
        return self.clients.count or num_workers

    def pinned(self, num_workers: int) -> bool:
        """Whether each client is always trained by its own rank (as many clients as worker ranks)."""
        return self.num_clients(num_workers) == num_workers

    def per_round(self, num_workers: int) -> int:
        """Clients taking part in each round."""
        return self.clients.per_round or self.num_clients(num_workers)

    def check_world(self, num_workers: int) -> None:
        """Validate the settings that depend on how many worker ranks there are."""
        if num_workers < 1:
            raise ConfigError("elfish-mpi needs at least 2 MPI ranks: rank 0 aggregates, ranks 1.. train")
        count = self.num_clients(num_workers)
        if self.clients.per_round > count:
            raise ConfigError(f"clients.per_round = {self.clients.per_round} is more than the {count} client(s) of this job")
        cap = self.workers.capacity
        if cap and len(cap) != count:
            if self.clients.count:
                raise ConfigError(
                    f"workers.capacity has {len(cap)} value(s) but the job has {count} clients (clients.count): one value a client"
                )
            raise ConfigError(
                f"workers.capacity has {len(cap)} value(s) but the job has {num_workers} worker rank(s) "
                f"(mpiexec -n {len(cap) + 1} matches the capacity list)"
            )
        if cap and self.clients.speed:
            raise ConfigError("give either workers.capacity or clients.speed, not both")
        if self.workers.fleet and self.clients.speed:
            raise ConfigError("give either workers.fleet or clients.speed, not both")
        kr = self.strategy.keep_ratios
        if kr and len(kr) != count:
            what = f"{count} clients" if self.clients.count else f"{num_workers} worker rank(s)"
            raise ConfigError(f"strategy.keep_ratios has {len(kr)} value(s) but the job has {what}")
        if kr and any(r < self.strategy.min_keep for r in kr):
            raise ConfigError(f"strategy.keep_ratios {kr} go below strategy.min_keep = {self.strategy.min_keep}")
        if not self.pinned(num_workers) and self.workers.throttle in ("cgroup", "affinity"):
            raise ConfigError(
                f"workers.throttle = {self.workers.throttle!r} slows a rank down, and with clients.count = {count} for "
                f"{num_workers} worker rank(s) a rank trains several clients of different speeds: use sleep or virtual "
                "(or one client per worker rank)"
            )

    def capacities(self, num_clients: int) -> list[float]:
        """Each client's capacity from workers.capacity / workers.fleet (clients.speed: clients.py)."""
        if self.workers.capacity:
            return list(self.workers.capacity)
        if self.workers.fleet:
            preset = FLEETS[self.workers.fleet]
            return [preset[i % len(preset)] for i in range(num_clients)]
        return [1.0] * num_clients

    # -- documentation -------------------------------------------------------
    @staticmethod
    def describe() -> str:
        lines = []
        for name, section_cls in SECTIONS.items():
            lines.append(f"[{name}]")
            for f in fields(section_cls):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                lines.append(f"  {name}.{f.name} = {json.dumps(default)}")
                lines.append(f"      {f.metadata.get('doc', '')}")
        return "\n".join(lines)


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, value); value parsed as a TOML value, else kept as a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set run.rounds=5")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    except RecursionError:
        raise ConfigError(f"--set {text!r}: the value is nested too deeply") from None
    return section, key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Read a TOML file (optional), apply ``--set`` overrides, validate."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        try:
            with p.open("rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {p} is a directory") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
        except RecursionError:
            raise ConfigError(f"config file {p} nests values too deeply") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"config file {p} cannot be read: {exc}") from None
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in SECTIONS:
            raise ConfigError(f"--set {text!r}: unknown section {section!r}; allowed: {', '.join(SECTIONS)}")
        if not isinstance(raw.setdefault(section, {}), dict):
            raise ConfigError(f"[{section}] must be a table of keys (it is {raw[section]!r})")
        raw[section][key] = value
    _threads_from_slurm(raw)
    try:
        return Config.from_dict(raw)
    except TypeError as exc:  # pragma: no cover - guarded by the unknown-key check
        raise ConfigError(str(exc)) from None


def _threads_from_slurm(raw: dict) -> None:
    """run.threads that neither the file nor --set gives follows SLURM's --cpus-per-task."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if not cpus:
        return
    run = raw.setdefault("run", {})
    if not isinstance(run, dict) or "threads" in run:
        return
    if not cpus.isdigit() or int(cpus) < 1:
        raise ConfigError(
            f"SLURM_CPUS_PER_TASK = {cpus!r} must be an integer >= 1 (run.threads follows it when not set)"
        )
    run["threads"] = int(cpus)


def config_from_json(text: str) -> Config:
    return Config.from_dict(json.loads(text))
