"""The FedAvg job of docs/benchmarks.md section 15 as a Flower simulation (run by flower.py in
Flower's own virtualenv, with this repository on PYTHONPATH for elfish_mpi.models and .data).

The same work as ``elfish-mpi train`` with strategy fedavg and one client per worker rank:

* the model: ``models.get_spec(model)``, initialized as rank 0 does (``torch.manual_seed(seed)``,
  ``spec.init_module()``);
* the data: ``data.ClientParts`` (the same partition of the training set over the clients, by
  ``run.seed``); Flower's partition-id i is client i;
* local training: ``steps`` SGD steps (lr, no momentum) of ``batch`` images each, in the order of
  elfish_mpi.data.Sampler (seeded by run.seed and the client; its cursor carried from round to
  round: (round - 1) * steps * batch), one torch thread;
* FedAvg weighted by the clients' sample counts (Flower's FedAvg, ``num-examples``);
* centralized evaluation of every round's global model on the test set (``data.load_test_data``)
  in the 100-image chunks of ``evaluation.evaluate``, by the ServerApp (``evaluate_fn``); the
  initial model is not evaluated (the MPI job does not evaluate it either), no client-side
  evaluation.

Writes ``--out`` (JSON): the time (``time.time()``) at the start of the script, when the strategy
started, at the end of each round's aggregation and of its evaluation, and at the end of the
simulation; each round's test accuracy, test loss and mean training loss.

    python flower_app.py --clients 4 --rounds 15 --out flower.json [--steps 20 --batch 32 --lr 0.05
        --test-samples 0 --seed 0 --cpus-per-client 1]
"""
from __future__ import annotations

import time

T_SCRIPT = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from elfish_mpi import data as datamod  # noqa: E402
from elfish_mpi import evaluation  # noqa: E402
from elfish_mpi.data import Sampler  # noqa: E402  (the same batch order as our workers)
from elfish_mpi.models import get_spec  # noqa: E402

def settings() -> dict:
    """The job's settings: from the environment (a Ray actor does not see our argv)."""
    return json.loads(os.environ["FLOWER_BENCH_SETTINGS"])


def spec_of(s: dict, check: bool = True):
    # (the ClientApp skips the model's meta-device check, as our worker ranks do: the ServerApp made it)
    return get_spec(s["model"], 10, (1, 28, 28), check=check)


_PARTS: dict = {}  # per process (a Ray actor): the clients' data, read once


def client_data(s: dict, client: int):
    key = (s["clients"], client)
    if key not in _PARTS:
        parts = datamod.ClientParts(s["data"], s["data_path"], s["clients"], s["partition"], s["seed"])
        part = parts.client(client)
        _PARTS[key] = (part.images, torch.from_numpy(part.labels.astype(np.int64)))
    return _PARTS[key]


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    s = settings()
    torch.set_num_threads(s["threads"])
    client = int(context.node_config["partition-id"])
    images, y = client_data(s, client)
    rnd = int(msg.content["config"]["server-round"])
    model = spec_of(s, check=False).module()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=0.0)
    sampler = Sampler(len(y), s["batch"], s["seed"], client, cursor=(rnd - 1) * s["steps"] * min(s["batch"], len(y)))
    loss_sum = 0.0
    for _ in range(s["steps"]):  # elfish_mpi.worker.train_step
        b = sampler.next()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(torch.from_numpy(datamod.normalize(images[b]))), y[b])
        loss.backward()
        opt.step()
        loss_sum += float(loss.detach())
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"train_loss": loss_sum / s["steps"], "num-examples": len(y)}),
    })
    return Message(content=content, reply_to=msg)


server_app = ServerApp()
RECORD: dict = {"t_script": T_SCRIPT, "rounds": []}


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    s = settings()
    torch.set_num_threads(s["threads"])
    spec = spec_of(s)
    torch.manual_seed(s["seed"])  # as rank 0 does (aggregator.py)
    initial = ArrayRecord(spec.init_module().state_dict())
    test = datamod.load_test_data(s["data"], s["data_path"], s["test_samples"])
    x = torch.from_numpy(datamod.normalize(test.images))
    y = torch.from_numpy(test.labels.astype(np.int64))
    model = spec.module()

    def evaluate_fn(rnd: int, arrays: ArrayRecord):
        if rnd == 0:
            return None  # (the initial model: not evaluated by the MPI job either)
        t0 = time.time()
        model.load_state_dict(arrays.to_torch_state_dict())
        acc, loss = evaluation.evaluate(model, x, y)
        RECORD["rounds"].append({"round": rnd, "t_aggregated": t0, "t_end": time.time(),
                                 "test_accuracy": acc, "test_loss": loss})
        return MetricRecord({"accuracy": acc, "loss": loss})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=s["clients"],
                      min_available_nodes=s["clients"])
    RECORD["t_strategy_start"] = time.time()
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=s["rounds"], evaluate_fn=evaluate_fn)
    RECORD["t_strategy_end"] = time.time()
    for row in RECORD["rounds"]:
        m = result.train_metrics_clientapp.get(row["round"])
        row["train_loss"] = float(m["train_loss"]) if m is not None else float("nan")


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--test-samples", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="lenet")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-path", default="")
    p.add_argument("--partition", default="iid")
    p.add_argument("--threads", type=int, default=1, help="torch threads per client and in the ServerApp")
    p.add_argument("--cpus-per-client", type=float, default=1.0,
                   help="Ray's client_resources num_cpus (Flower's default, 2, runs one client at a time on 2 cores)")
    a = p.parse_args()
    s = {"clients": a.clients, "rounds": a.rounds, "steps": a.steps, "batch": a.batch, "lr": a.lr,
         "test_samples": a.test_samples, "seed": a.seed, "model": a.model, "data": a.data,
         "data_path": str(datamod.resolve_path(a.data, a.data_path)), "partition": a.partition, "threads": a.threads}
    os.environ["FLOWER_BENCH_SETTINGS"] = json.dumps(s)
    RECORD["settings"] = s
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=a.clients,
                   backend_config={"client_resources": {"num_cpus": a.cpus_per_client, "num_gpus": 0.0}})
    RECORD["t_simulation_end"] = time.time()
    import flwr
    import ray
    RECORD["versions"] = {"flwr": flwr.__version__ if hasattr(flwr, "__version__") else "", "ray": ray.__version__,
                          "torch": torch.__version__, "numpy": np.__version__}
    if len(RECORD["rounds"]) != a.rounds:
        raise SystemExit(f"flower_app: {len(RECORD['rounds'])} rounds evaluated of {a.rounds}")
    with open(a.out, "w") as f:
        json.dump(RECORD, f, indent=1)


if __name__ == "__main__":
    cli()
