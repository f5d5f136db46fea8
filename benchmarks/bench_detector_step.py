"""One training iteration of the demo's Mask R-CNN: SN (fused kernels and reference path) against GN and BN.

The demo's detector (half-width ResNet-18 + FPN, the norm in every layer of
backbone, FPN and box/mask heads) built for each norm from the same config, on
the same batch of 2 training images of the shapes dataset, with the same SGD
optimizer: forward, losses, backward and the optimizer step, timed round-robin
(SN, SN reference, GN, BN, SN, ...) so that every variant sees the same machine
load; medians and their ratios to GN. Only the normalization layers differ
between the variants.

    python benchmarks/bench_detector_step.py                # 1 and 2 threads, 15 rounds each
    python benchmarks/bench_detector_step.py --quick        # a smoke test

Writes ``detector_step.{md,json}`` under ``benchmarks/results/`` (or ``--out``).
"""
import argparse
import functools
import os
import tempfile
import time
from typing import Dict

import torch

from _common import REPO, RECORDED_PACKAGES, RESULTS_DIR, machine_record, markdown_table, write_atomically, \
    write_json_atomically
from _timing import interleaved_medians
from sn_plugin import kernels
from sn_plugin.apps.coco_detector import FULL, Plan, build_config, builtin_dataset, default_config
from sn_plugin.data.coco import check_coco_dataset

VARIANTS = (("SN", "SN", "auto"), ("SN (reference path)", "SN", "reference"), ("GN", "GN", "auto"),
            ("BN", "BN", "auto"))


def build(norm: str, dataset, out: str):
    """The demo's detector with ``norm`` everywhere, an SGD optimizer like the demo's, and one training batch."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.runner import Runner

    import sn_plugin.integrations.openmmlab  # noqa: F401  (registers SN)

    register_all_modules()

    train, val = check_coco_dataset(dataset.train_annotations, dataset.train_images, dataset.val_annotations,
                                    dataset.val_images)
    plan = Plan(model="mask_rcnn", depth=18, width=None, norm=norm, image_size=dataset.image_size,
                max_iters=FULL.max_iters, val_interval=0, seed=0, batch_stats_batches=1, log_interval=50,
                quick=False)
    cfg = build_config(default_config(), plan, train, val, out)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    optim = cfg.optim_wrapper.optimizer
    optimizer = torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum,
                                weight_decay=optim.weight_decay)
    loader = Runner.build_dataloader({**cfg.train_dataloader, "num_workers": 0, "persistent_workers": False},
                                     seed=0)
    batch = next(iter(loader))
    return model, optimizer, batch


def step(model, optimizer, batch) -> None:
    data = model.data_preprocessor(batch, training=True)
    losses = model(**data, mode="loss")
    loss, _ = model.parse_losses(losses)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def time_variants(built: Dict[str, tuple], rounds: int, warmup: int) -> Dict[str, float]:
    """Median seconds of a training step per variant, each on its backend, with the same proposal
    sampling for every variant in a round."""
    def prepare(name: str, round_index: int) -> None:
        kernels.set_backend(built[name][0])
        torch.manual_seed(round_index)

    steps = {name: functools.partial(step, *parts) for name, (_, *parts) in built.items()}
    previous = kernels.requested_backend()
    try:
        return interleaved_medians(steps, rounds, warmup, prepare=prepare)
    finally:
        kernels.set_backend(previous)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="smoke test: the tiny dataset, 2 rounds, 1 thread")
    parser.add_argument("--data", default=os.path.join(REPO, "work_dirs", "data"))
    parser.add_argument("--out", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    rounds, warmup, threads = (2, 1, [1]) if args.quick else (args.rounds, 3, args.threads)
    dataset = builtin_dataset("shapes", args.data, args.quick)
    results = {"rounds": rounds, "threads": {}}
    with tempfile.TemporaryDirectory() as out:
        built = {name: (backend, *build(norm, dataset, os.path.join(out, name.split()[0])))
                 for name, norm, backend in VARIANTS}
        for count in threads:
            torch.set_num_threads(count)
            medians = time_variants(built, rounds, warmup)
            results["threads"][str(count)] = {
                name: {"median_ms": 1000 * medians[name], "ratio_to_GN": medians[name] / medians["GN"]}
                for name in built}
    results["machine"] = machine_record(RECORDED_PACKAGES)
    results["date"] = time.strftime("%Y-%m-%d")
    os.makedirs(args.out, exist_ok=True)
    write_json_atomically(os.path.join(args.out, "detector_step.json"), results)
    markdown = render(results)
    write_atomically(os.path.join(args.out, "detector_step.md"), markdown)
    print(markdown)
    return results


def render(results: dict) -> str:
    names = [name for name, _, _ in VARIANTS]
    rows = [[f"{threads} thread{'s' if threads != '1' else ''}"]
            + [f"{cells[name]['median_ms']:.0f} ms ({cells[name]['ratio_to_GN']:.2f}x)" for name in names]
            for threads, cells in results["threads"].items()]
    machine = results["machine"]
    return "\n".join([
        "# One training iteration of the demo's Mask R-CNN, by normalization",
        "",
        "Half-width ResNet-18 + FPN + box and mask heads, the norm in every layer, 2 images of 128x128 "
        "(the same batch for every variant), forward + backward + SGD step; median over "
        f"{results['rounds']} round-robin rounds (in parentheses: the ratio to GN).",
        "",
        markdown_table(["", *names], rows),
        "",
        f"Measured {results['date']} on {machine['processor']} ({machine['cpu_count']} cores), torch "
        f"{machine['versions'].get('torch')}: `{machine['command']}`.",
        "",
    ])


if __name__ == "__main__":
    main()
