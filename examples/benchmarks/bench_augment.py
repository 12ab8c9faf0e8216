"""Micro-benchmark of artlearn.augment's batch pipeline: cost beside a ResNet-18 step, error, store memory.

    python examples/benchmarks/bench_augment.py                       # bs 32 at 64 and 128 px (real data if present)
    python examples/benchmarks/bench_augment.py --data ../shared/data/artworks  # + each store rule's memory there
    python examples/benchmarks/bench_augment.py --sizes 224 288 --bs 64         # on a GPU the same runs on cuda

Prints, for each size: ms per batch of train_views (RandomResizedCrop + rotation + flip, antialiased), center_views
and plain bilinear (no antialias), beside a ResNet-18 forward+backward of that batch, and their ratio; medians (and
minima) over --reps interleaved repetitions, so that other load on the machine hits both alike. Then the mean / max
absolute error (0..255) of single views against torchvision's resized_crop (unturned boxes) and against a densely
sampled tent filter (turned boxes: torchvision's antialias filter along the view's own axes), antialiased and plain.
Last, with --data (or ../shared/data/artworks present): the uint8 memory each Recipe.store rule takes for that table.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
import torchvision.transforms.v2.functional as TF

from artlearn.synthetic import texture_probe
from artlearn.augment import tent_reference, center_views, crop_affine, resample, store_side, train_views
from artlearn.cli import add_recipe_flag, read_competition, run_cli

DEFAULT_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "artworks"


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    add_recipe_flag(p, "bs", default=32)
    add_recipe_flag(p, "min_scale", default=0.08)
    p.add_argument("--image-side", type=int, default=256, help="stored images' own shorter side (the real data: 256)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", type=Path, help="competition folder: print the store memory its images need")
    p.add_argument("--skip", default="", help="comma-separated: speed,quality,memory")
    return p.parse_args(argv)


def textured(h, w, seed=0) -> torch.Tensor:
    """`artlearn.synthetic.texture_probe` as a uint8 (3, h, w) tensor."""
    return torch.from_numpy(texture_probe(h, w, seed)).permute(2, 0, 1).contiguous()


def sync(device):
    """Wait for queued GPU work so timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    """Seconds one call takes."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def speed(args, device):
    """ms per batch of the views and of a ResNet-18 step, interleaved; their ratio."""
    model = torchvision.models.resnet18(num_classes=50).to(device)
    print(f"speed on {device} ({torch.get_num_threads()} threads), bs {args.bs}, min_scale {args.min_scale}, "
          f"images {args.image_side} px: ms per batch, median (min) over {args.reps}")
    for S in args.sizes:
        side = store_side(S, args.min_scale, args.image_side)
        times = time_jobs(jobs_for(args, device, model, S, side), args.reps, device)
        model_ms = statistics.median(times["resnet18 fwd+bwd"])
        print(f"  {S} px (store side {side}):")
        for name, ts in times.items():
            share = 100 * statistics.median(ts) / model_ms
            ratio = "" if name.startswith("resnet") else f"  = {share:.2f}% of the step"
            print(f"    {name:18} {statistics.median(ts):8.2f} ({min(ts):.2f}){ratio}")


def jobs_for(args, device, model, S: int, side: int) -> dict:
    """The timed calls for one output size: views of a batch stored at `side` (both layouts), and the model step."""
    images = torch.stack([textured(side, side, seed=k) for k in range(args.bs)]).to(device)
    images_cl = images.contiguous(memory_format=torch.channels_last)  # same (N, 3, H, W) tensor, HWC in memory
    sizes = torch.full((args.bs, 2), side)
    x = torch.randn(args.bs, 3, S, S, device=device)
    gen = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[side // 8, side // 8, side * 3 // 4, side * 3 // 4]] * args.bs, dtype=torch.float32)
    plain_maps = crop_affine(boxes, sizes, torch.full((args.bs,), 7.0), None, S)

    def step():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    return {"train_views": lambda: train_views(images, sizes, S, gen, min_scale=args.min_scale),
            "  channels_last": lambda: train_views(images_cl, sizes, S, gen, min_scale=args.min_scale),
            "center_views": lambda: center_views(images, sizes, S),
            "  channels_last ": lambda: center_views(images_cl, sizes, S),
            "plain bilinear": lambda: resample(images, sizes, plain_maps, S, antialias=False),
            "resnet18 fwd+bwd": step}


def time_jobs(jobs: dict, reps: int, device) -> dict:
    """ms of each job over `reps` interleaved rounds, after one warm-up call each."""
    for fn in jobs.values():
        fn()
    times = {k: [] for k in jobs}
    for _ in range(reps):
        for name, fn in jobs.items():
            times[name].append(timed(fn, device) * 1e3)
    return times


def quality(args):
    """Mean / max abs error (0..255) against torchvision's resized_crop and against the tent oracle when turned."""
    images = {"textured 256x256": textured(256, 256)}
    if args.data and (args.data / "train").is_dir():
        import numpy as np
        from PIL import Image
        for path in sorted((args.data / "train").glob("*.jpg"))[:3]:
            arr = np.array(Image.open(path).convert("RGB"))
            images[f"painting {path.name}"] = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    S = 48
    print(f"error at {S} px, mean/max in 0..255 (antialiased | plain bilinear); shrink = box side / {S}")
    for name, img in images.items():
        h, w = img.shape[1:]
        print(f"  {name}:")
        for shrink in (0.7, 1.5, 2.5, 3.5, 5.0):
            side = min(round(shrink * S), h, w)
            box = ((h - side) // 2, (w - side) // 2, side, side)
            ref = TF.resized_crop(img.float(), *box, [S, S], antialias=True)
            cells = []
            for angle, target in ((0.0, ref), (9.0, None)):
                maps = crop_affine(torch.tensor([box], dtype=torch.float32), None, torch.tensor([angle]), None, S)
                if target is None:  # the tent only when shrinking: torchvision does not blur an upsampled view
                    target = tent_reference(img, maps, S, taps=8 if side > S else 1)[0]
                errs = []
                for antialias in (True, False):
                    d = (resample(img[None], torch.tensor([[h, w]]), maps, S, antialias=antialias)[0] - target).abs()
                    errs.append(f"{d.mean():.2f}/{d.max():.0f}")
                label = "vs resized_crop" if angle == 0 else "turned 9 deg vs tent"
                cells.append(f"{label} {errs[0]:>10} | {errs[1]:<10}")
            print(f"    shrink {side / S:4.2f}: " + "   ".join(cells))


def memory(data: Path):
    """Bytes each `Recipe.store` rule keeps for every training image (store_presize with this machine's memory
    budget; images smaller than the side stay as they are), per training size, at min_scale 0.08 and 0.35."""
    from PIL import Image
    from artlearn.recipe import STORES
    from artlearn.store import default_memory_budget, store_presize
    table = read_competition(data, test=False, folders=False).train
    sizes = [Image.open(p).size for p in table["img_path"]]  # (w, h), header only, no decode
    shorts = sorted({min(s) for s in sizes})
    budget = default_memory_budget()
    print(f"store memory for {len(sizes)} images of {data} (shorter sides {shorts[0]}..{shorts[-1]} px), uint8 RGB, "
          f"memory budget {budget / 2**30:.1f} GiB:")
    for min_scale in (0.08, 0.35):
        for rule in STORES:
            cells = []
            for S in (64, 128, 224, 288, 320):
                side = store_presize(rule, S, min_scale, len(sizes), budget)
                total = 0
                for w, h in sizes:
                    scale = min(1.0, side / min(w, h))
                    total += 3 * max(1, round(h * scale)) * max(1, round(w * scale))
                cells.append(f"{S} px: side {side} -> {total / 2**20:6.0f} MiB")
            print(f"  min_scale {min_scale}, store '{rule}': " + "; ".join(cells))


def main(argv=None) -> int:
    """Run the sections not skipped; a bad input ends with one `error:` line and exit status 2."""
    return run_cli(_main, argv)


def _main(argv=None) -> int:
    """main's work (errors reported by run_cli)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    data = args.data or (DEFAULT_DATA if (DEFAULT_DATA / "train.csv").is_file() else None)
    args.data = data.resolve() if data else None
    if "speed" not in skip:
        speed(args, torch.device(args.device))
    if "quality" not in skip:
        quality(args)
    if "memory" not in skip and args.data:
        memory(args.data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
