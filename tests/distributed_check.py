"""Run by tests/test_train_adapter.py under `torchrun --nproc_per_node 2` (gloo, 127.0.0.1): each rank holds its
half of a batch. Rank 0 saves the loss and the summed gradients, uncached and GradCache, to OUT/grads.pt; then
both ranks run scripts/train_adapter.py's main with ARGS... (the process group already exists). In float64: the
claim is that two ranks compute the one-process algorithm, so float64 rounding is all that may differ."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from jina_v4 import JinaV4  # noqa: E402
from jina_v4.apps.training import backward, retrieval_loss, sync_grads, trainable, world  # noqa: E402

TASK = "retrieval"


def image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def distributed_groups(rank: int) -> list[tuple[list, str]]:
    """Rank `rank`'s queries, positives and hard negatives (unequal counts and lengths across the ranks)."""
    if rank == 0:
        return [
            (["short", "a query of several more words"], "query"),
            (["its passage", image(60, 90, 0)], "passage"),
            (["one negative", "another " * 9], "passage"),
        ]
    return [
        (["third query here", "q4"], "query"),
        ([image(90, 60, 1), "passage four " * 5], "passage"),
        (["a lone negative"], "passage"),
    ]


def loss_of(q, p, n):
    return retrieval_loss(q, p, n, tau=0.05, dims=[8, None])


def main() -> None:
    checkpoint, out, args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, size = world()
    model = JinaV4.from_pretrained(checkpoint, device="cpu", dtype="float64")
    params = trainable(model, TASK)
    groups = [model.prepare(xs, TASK, pn) for xs, pn in distributed_groups(rank)]
    results = {}
    for minibatch in (None, 2):
        loss = backward(model, groups, lambda e: loss_of(*e), minibatch)
        sync_grads(list(params.values()))
        results[minibatch] = (loss.item(), {n: p.grad.clone() for n, p in params.items()})
        for p in params.values():
            p.grad = None
    if rank == 0:
        torch.save(results, out / "grads.pt")
    import train_adapter

    train_adapter.main(args)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
