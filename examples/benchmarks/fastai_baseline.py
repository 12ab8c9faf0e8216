"""fastai's own way, without artlearn: `vision_learner(dls, xresnet18, pretrained=False)` + `fit_one_cycle`.

The baseline a fastai user would write for one fold of the same split: `ImageDataLoaders.from_df` with
`Resize` + `aug_transforms(size, min_scale=0.35)` + ImageNet normalisation, fastai's default loss, the last epoch's
weights, flip-TTA on the validation fold (as the plain script and artlearn's `flip`). With --minutes, the epochs are
those that fit at the pace of a throwaway learner's first batches (fit_one_cycle needs its length up front), the
final TTA pass included. Writes result.json (accuracy, macro-F1, epochs, seconds) and oof.csv into --out. The
training uses no artlearn; artlearn's command-line error exit and atomic file writes carry the script's own part.

    python examples/benchmarks/fastai_baseline.py --train-csv ../shared/data/artworks/train.csv \
        --folds-csv runs/budget/folds.csv --fold 0 --minutes 7 --out runs/fastai/fold0
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from sklearn.metrics import accuracy_score, f1_score

from artlearn.cli import run_cli
from artlearn.files import atomic_write_csv, atomic_write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_torchvision import read_table  # noqa: E402  (the same table and folds as the plain script, beside it)

PROBE_BATCHES, PROBE_WARMUP = 8, 2


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-csv", required=True)
    p.add_argument("--folds-csv", help="img_path, artist, fold (default: sklearn's StratifiedKFold(4), seed 42)")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="fit_one_cycle's lr_max")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--minutes", type=float, help="wall-time budget instead of --epochs")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.minutes is not None and not args.minutes > 0:
        raise ValueError(f"--minutes {args.minutes}: need a positive number of minutes")
    if args.epochs < 1:
        raise ValueError(f"--epochs {args.epochs}: need at least 1")
    return args


def make_dls(table, fold: int, size: int, bs: int, seed: int):
    """fastai DataLoaders of one fold, the way fastai's docs build them."""
    from fastai.vision.all import ImageDataLoaders, Normalize, Resize, aug_transforms, imagenet_stats
    df = table.assign(is_valid=table["fold"] == fold)
    return ImageDataLoaders.from_df(df, path="/", fn_col="img_path", label_col="artist", valid_col="is_valid",
                                    item_tfms=Resize(int(size * 1.25)), bs=bs, seed=seed, num_workers=0,
                                    batch_tfms=[*aug_transforms(size=size, min_scale=0.35),
                                                Normalize.from_stats(*imagenet_stats)])


def make_learner(dls):
    """vision_learner on an untrained xresnet18."""
    from fastai.vision.all import accuracy, vision_learner, xresnet18
    return vision_learner(dls, xresnet18, pretrained=False, metrics=accuracy)


def epoch_seconds(dls) -> float:
    """Seconds one epoch (training + validation) takes here, from a throwaway learner's first batches."""
    from fastai.callback.core import Callback, CancelFitException
    n = min(len(dls.train), PROBE_WARMUP + PROBE_BATCHES)

    class Stamps(Callback):
        def before_train(self):
            self.stamps = [time.perf_counter()]

        def after_batch(self):
            self.stamps.append(time.perf_counter())
            if len(self.stamps) > n:
                raise CancelFitException()
    learn, stamps = make_learner(dls), Stamps()
    learn.fit(1, cbs=[stamps])
    gaps = [b - a for a, b in zip(stamps.stamps, stamps.stamps[1:])]
    train_s = statistics.median(gaps[PROBE_WARMUP:] or gaps)
    model, seen, started = learn.model.eval(), 0, time.perf_counter()
    with torch.no_grad():
        for i, (x, _) in enumerate(dls.valid):
            model(x)
            seen += len(x)
            if i >= 1:
                break
    valid_s = (time.perf_counter() - started) / seen * len(dls.valid_ds)
    return train_s * len(dls.train) + valid_s


def flip_tta(learn):
    """(probabilities, targets) of the validation fold: softmax of the image and its mirror averaged."""
    model, probs, targets = learn.model.eval(), [], []
    with torch.no_grad():
        for x, y in learn.dls.valid:
            probs.append((model(x).softmax(1) + model(x.flip(3)).softmax(1)) / 2)
            targets.append(y)
    return torch.cat(probs).numpy(), torch.cat(targets).numpy()


def main(argv=None) -> int:
    """Train and score one fold; a bad argument or input ends with one `error:` line and exit status 2."""
    return run_cli(_main, argv)


def _main(argv=None) -> int:
    """main's work (errors reported by run_cli)."""
    args = parse_args(argv)
    from fastai.vision.all import set_seed
    start, out = time.time(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = read_table(args)
    set_seed(args.seed)
    dls = make_dls(table, args.fold, args.size, args.bs, args.seed)
    if len(dls.train) == 0:
        raise ValueError(f"fold {args.fold}: {len(dls.train_ds)} training images, fewer than one batch of --bs "
                         f"{args.bs} (fastai drops the last partial batch): give a smaller --bs")
    epochs = args.epochs
    if args.minutes is not None:
        per_epoch = epoch_seconds(dls)
        left = args.minutes * 60 - (time.time() - start) - 0.5 * per_epoch  # the final flip-TTA pass
        epochs = max(1, int(left // per_epoch))
        print(f"budget: {epochs} epochs fit in {args.minutes:g} min ({per_epoch:.0f} s per epoch)", flush=True)
    set_seed(args.seed)
    learn = make_learner(dls)
    learn.fit_one_cycle(epochs, lr_max=args.lr)
    probs, targets = flip_tta(learn)
    vocab = list(dls.vocab)
    valid = dls.valid.items
    pred = [vocab[i] for i in probs.argmax(1)]
    truth = [vocab[i] for i in targets]
    oof = pd.DataFrame({"img_path": valid["img_path"].values, "fold": args.fold, "artist": truth, "pred": pred})
    oof = pd.concat([oof, pd.DataFrame(probs, columns=[f"p_{c}" for c in vocab])], axis=1)
    atomic_write_csv(out / "oof.csv", oof)
    result = dict(script="fastai_baseline", fold=args.fold, arch="xresnet18", size=args.size, epochs=epochs,
                  minutes=args.minutes, bs=args.bs, lr=args.lr, seed=args.seed, n_valid=len(valid),
                  accuracy=float(accuracy_score(truth, pred)),
                  f1_macro=float(f1_score(truth, pred, average="macro", zero_division=0)),
                  seconds=time.time() - start, history=[list(map(float, r)) for r in learn.recorder.values])
    atomic_write_json(out / "result.json", result)
    print(f"fold {args.fold}: accuracy {result['accuracy']:.4f}  macro-F1 {result['f1_macro']:.4f}  "
          f"({epochs} epochs, {result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
