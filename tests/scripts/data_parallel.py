"""Run by tests/test_devices.py in a process with 4 forced CPU devices: trains the same
tiny run on 1 and on 4 devices, and one stopped on 4 devices and resumed on 1 (and the
other way round), with a wsd schedule and an EMA of the parameters; prints the numbers as
JSON."""

import json
import sys
from pathlib import Path

import jax
import numpy as np

from tvq.distributed.devices import data_mesh, split_largest_axis
from tvq.errors import Interrupted
from tvq.train import train_from_files

ARCH = dict(d_model=32, d_k=16, d_v=32, n_head=2, n_code=16, n_layer=1, mem_len=16,
            e_scale=32**-0.5)  # fmt: skip
# a warmup-stable-decay schedule and an average of the parameters (what the model holds):
# both resume exactly on another device count too
SETTINGS = dict(steps=4, batch_size=4, update_len=32, block_len=16, lr=1e-2, warmup=1,
                eval_every=4, save_every=100, schedule="wsd", decay_fraction=0.5,
                min_lr=1e-3, ema=0.5)  # fmt: skip
TEXTS = [Path(__file__).resolve().parent.parent / "data"]


def train(out: Path, devices: int, stop_at: int | None = None, shard: bool = False):
    def progress(p):
        if p.step == stop_at:
            raise KeyboardInterrupt

    return train_from_files(texts=TEXTS, out=out, use_bytes=True, architecture=ARCH,
                            settings=SETTINGS, devices=devices, on_progress=progress,
                            shard_params=shard, val_fraction=0)  # fmt: skip


def losses(out: Path) -> list[float]:
    lines = (out / "train" / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def max_diff(a, b) -> float:
    leaves = zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params),
                 strict=True)  # fmt: skip
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in leaves)


def main(out: Path) -> None:
    one, four = train(out / "one", 1), train(out / "four", 4)
    sharded = train(out / "sharded", 4, shard=True)
    mesh = data_mesh(4)
    embs = split_largest_axis(mesh, one.params)["token_embedder"]["embs"]  # [259, 32]
    scale = split_largest_axis(mesh, {"x": np.zeros([3])})["x"]
    resumed = {}
    for first, then in ((4, 1), (1, 4)):
        folder = out / f"from{first}to{then}"
        try:
            train(folder, first, stop_at=2)
        except Interrupted:
            pass
        resumed[f"{first}->{then}"] = train(folder, then)
    print(json.dumps({
        "devices": len(jax.devices()),
        "losses": {"1": losses(out / "one"), "4": losses(out / "four")},
        "params_1_vs_4": max_diff(one, four),
        "params_1_vs_4_sharded": max_diff(one, sharded),
        "losses_sharded": losses(out / "sharded"),
        "embs_spec": list(embs.sharding.spec),
        "embs_shard": list(embs.addressable_shards[0].data.shape),
        "small_spec": list(scale.sharding.spec),
        "resumed_vs_1": {k: max_diff(one, m) for k, m in resumed.items()},
        "steps": {k: m.metadata["steps"] for k, m in resumed.items()},
    }))  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]))
