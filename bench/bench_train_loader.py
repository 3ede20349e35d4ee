"""Recognition training throughput: fed by the shard loader vs fed tensors already in memory.

Same model, same batch size, same transform output; the in-memory run is the ceiling (no decoding,
no augmentation, no I/O), so loader / memory is the share of training speed the loader leaves. The
target is >= 0.9: the loader is not the bottleneck. Rounds alternate between the two feeds so a
shared machine's load drifts over both alike; the median round counts.

    .venv/bin/python bench/bench_train_loader.py                       # CPU: iresnet_tiny at 112 px
    .venv/bin/python bench/bench_train_loader.py --backbone iresnet50 --batch 256 --workers 8   # GPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator

import torch

from tests.fixtures.procedural_export import ProceduralExportSpec, write_procedural_export
from training.augmentations import recognition_train_transform
from training.config import AugmentConfig
from training.export_index import load_export
from training.iresnet import build_iresnet
from training.margin_losses import MarginSoftmaxHead, margin_from_config
from training.recognition_model import RecognitionModule
from training.shard_loader import RecognitionDecoder, ShardStream, make_loader


def _train_steps(
    module: torch.nn.Module, opt: torch.optim.Optimizer, batches: Iterator, steps: int, device: torch.device
) -> float:
    """Samples per second over ``steps`` optimizer steps."""
    amp = device.type == "cuda"
    if amp:
        torch.cuda.synchronize()
    start, samples = time.perf_counter(), 0
    for _ in range(steps):
        images, labels, _ = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = module(images, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        samples += images.shape[0]
    if amp:
        torch.cuda.synchronize()
    return samples / (time.perf_counter() - start)


def _forever(items: list) -> Iterator:
    while True:
        yield from items


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--export", help="an existing run or export folder; default: render a procedural one")
    parser.add_argument("--backbone", default="iresnet_tiny")
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[0, 1], help="DataLoader worker counts to try"
    )
    parser.add_argument("--steps", type=int, default=8, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads of the trainer")
    parser.add_argument("--randaugment", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    tmp = None
    if args.export is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-loader-")
        t0 = time.perf_counter()
        write_procedural_export(
            tmp.name,
            ProceduralExportSpec(
                train_identities=48, val_identities=2, images_per_identity=16, shard_size=128
            ),
        )
        print(f"rendered a procedural export (768 train crops, 112 px) in {time.perf_counter() - t0:.1f}s")
    export = load_export(args.export or tmp.name)
    split = export.split("train")
    transform = recognition_train_transform(AugmentConfig(randaugment=args.randaugment), args.input_size)
    decoder = RecognitionDecoder(transform)

    torch.manual_seed(0)
    backbone = build_iresnet(args.backbone, 512, args.input_size)
    module = RecognitionModule(
        backbone, MarginSoftmaxHead(512, split.identities, margin_from_config("arcface", 64.0, 0, 0, 0))
    ).to(device)
    opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)

    # In memory: the transform's outputs for enough samples, collated once.
    stream = iter(ShardStream(split.shards, decoder, seed=1))
    memory = []
    for _ in range(4):
        items = [next(stream) for _ in range(args.batch)]
        memory.append(
            (torch.stack([i[0] for i in items]), torch.tensor([i[1] for i in items]), [i[2] for i in items])
        )
    feeds = {"memory": _forever(memory)}
    for w in args.workers:
        loader = make_loader(ShardStream(split.shards, decoder, seed=2, shuffle_buffer=512), args.batch, w)
        feeds[f"loader(workers={w})"] = iter(loader)

    for it in feeds.values():  # warm up: allocator, loader processes, first shard opens
        _train_steps(module, opt, it, 2, device)
    rates: dict[str, list[float]] = {name: [] for name in feeds}
    for _ in range(args.rounds):
        for name, it in feeds.items():
            rates[name].append(_train_steps(module, opt, it, args.steps, device))

    alone = iter(make_loader(ShardStream(split.shards, decoder, seed=3, shuffle_buffer=512), args.batch, 0))
    next(alone)
    start = time.perf_counter()
    loaded = sum(next(alone)[0].shape[0] for _ in range(args.steps))
    loader_alone = loaded / (time.perf_counter() - start)

    base = statistics.median(rates["memory"])
    print(
        f"device {device}, backbone {args.backbone} @ {args.input_size}px, batch {args.batch}, "
        f"{args.rounds} rounds x {args.steps} steps, torch threads {torch.get_num_threads()}"
    )
    print(f"{'feed':<22}{'samples/s (median)':>20}{'ratio vs memory':>18}")
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"{name:<22}{med:>20.1f}{med / base:>18.3f}")
    print(
        f"loader alone (no training, 1 process): {loader_alone:.1f} samples/s = "
        f"{loader_alone / base:.1f}x what training consumes"
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
