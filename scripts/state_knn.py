"""How much of the action chunk the state alone explains: k-nearest-neighbour regression from the normalized state of
the training rows to their chunks, scored on the validation rows in the dataset's units, beside hold still and the
mean action. A yardstick for what a policy could learn from the state.

    python scripts/state_knn.py SHARDS [--k 1 5 20]
"""

from __future__ import annotations

import argparse

import numpy as np

from ki_data.artifacts import DataArtifacts
from ki_data.schema import read_rows


def load(data: DataArtifacts, split: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [read_rows(p) for p in data.shard_paths(split)]
    return np.concatenate([r["state"] for r in rows]), np.concatenate([r["actions"] for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shards")
    p.add_argument("--k", type=int, nargs="+", default=[1, 5, 20])
    a = p.parse_args()
    data = DataArtifacts.open(a.shards)
    s_train, a_train = load(data, "train")
    s_val, a_val = load(data, "val")
    raw_val = data.unnormalize_state(s_val)
    truth = data.absolute_actions(a_val, raw_val)
    mse = lambda pred: float(np.mean((pred - truth) ** 2))  # noqa: E731
    hold = mse(data.hold_still_chunks(raw_val, truth.shape[1]))
    print(f"{len(s_val)} validation rows; hold still {hold:.0f}, mean action "
          f"{mse(data.absolute_actions(np.broadcast_to(a_train.mean(0), a_val.shape), raw_val)):.0f}")
    for k in a.k:
        near = [np.argpartition(((s_train - s) ** 2).sum(1), k)[:k] for s in s_val]
        pred = data.absolute_actions(np.stack([a_train[i].mean(0) for i in near]), raw_val)
        print(f"{k}-nearest neighbours on the state: MSE {mse(pred):.0f} ({mse(pred) / hold:.2f} x hold still)")


if __name__ == "__main__":
    main()
