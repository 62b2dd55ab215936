"""A job of nine ranks (eight workers) on two cores: it runs, every rank holding a share of
the test set evaluates it, and the figures rank 0 records are those of the whole test set."""
import h5py
import numpy as np
import pytest
import torch

from elfish_mpi import data as datamod
from elfish_mpi.evaluation import evaluate, num_chunks, shares
from elfish_mpi.models import lenet
from elfish_mpi.submodel import flat_from_state_dict, full_model, load_flat

from test_cli_job import SAMPLE, launch, tiny

TEST_IMAGES = 1000  # 10 chunks over 9 ranks


@pytest.mark.timeout(300)
def test_nine_ranks_share_the_evaluation_and_record_the_whole_test_sets_figures(tmp_path):
    # Prepare: the virtual clock (no sleeping), the quickstart fleet over 8 workers
    out = tmp_path / "run"
    capacities = [1.0, 1.0, 0.5, 0.25] * 2
    # Execute
    res = launch(
        9, *tiny(out, 2), "--set", f"data.test_samples={TEST_IMAGES}", "--set", "workers.throttle=virtual",
        "--set", f"workers.capacity={capacities}", "--set", "run.eval_on=all", "--set", "strategy.profile_steps=1",
    )
    # Assert
    assert res.returncode == 0, res.stderr
    # the first evaluation is split by capacity (rank 0 counting as 1); later ones by measured rates
    first = shares(num_chunks(TEST_IMAGES), [1.0, *capacities])
    holders = [w for w in range(8) if first[w + 1][1] > first[w + 1][0]]
    with h5py.File(out / "checkpoint.h5", "r") as f:
        assert int(f.attrs["num_workers"]) == 8
        eval_time = f["workers/eval_time"][()]
        root_share = f["metrics/eval_root_share"][()]
        recorded = f["metrics/test_accuracy"][-1], f["metrics/test_loss"][-1]
        state = {k: f["model"][k][()] for k in f["model"]}
    for w in range(8):  # the workers with a share evaluated it, the others did not
        assert (eval_time[0, w] > 0) == (w in holders), (w, eval_time)
    assert root_share[0] == first[0][1] / 10 and np.all((root_share >= 0) & (root_share <= 1)), root_share
    assert np.all((eval_time > 0).any(axis=1) == (root_share < 1)), (eval_time, root_share)
    # the final model, evaluated here in one process on the same images: the same figures, bit for bit
    spec = lenet()
    model = full_model(spec)
    load_flat(model, flat_from_state_dict(spec, state))
    test = datamod.load_test_data("fashion-mnist", str(SAMPLE), TEST_IMAGES)
    torch.set_num_threads(1)
    here = evaluate(model, torch.from_numpy(datamod.normalize(test.images)), torch.from_numpy(test.labels))
    assert here == recorded, (here, recorded)
