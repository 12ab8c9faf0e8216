"""The report's recipe as a user would write it by hand: plain PyTorch + torchvision, no artlearn.

One fold of a stratified K-fold split: RandomResizedCrop(size, scale=(0.35, 1)) + RandomRotation(15) + horizontal
flip, normalisation with statistics of the training split, a torchvision ResNet (weights=None), Adam, cross-entropy
with label smoothing 0.05, per-epoch cosine annealing, best epoch by valid loss, flip-TTA on the validation fold.
Writes result.json (accuracy, macro-F1, best epoch, per-epoch history) and oof.csv into --out.

    python examples/benchmarks/plain_torchvision.py --train-csv ../shared/data/artworks/train.csv \
        --folds-csv runs/compare/<budget>/folds.csv --fold 0 --size 64 --epochs 12 --out runs/plain/fold0

--folds-csv (img_path, artist, fold; written by compare_recipes.py) gives the SAME folds as artlearn; without it
the folds come from sklearn's StratifiedKFold(4, shuffle=True, random_state=42). Deterministic for a seed (and a
--workers count) on CPU; on a GPU when there is one (fp32). The training uses no artlearn: only the command line's
one-line error exit (artlearn.cli.run_cli, when run as a script) does.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

ARCHS = ("resnet18", "resnet34", "resnet50")  # the torchvision ResNets this script trains (--arch)


class CsvImages(Dataset):
    """(image tensor, label index) for the rows of a table with img_path and artist."""

    def __init__(self, table, classes, tfm):
        self.paths, self.tfm = table["img_path"].tolist(), tfm
        self.labels = [classes.index(a) for a in table["artist"]]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.tfm(Image.open(self.paths[i]).convert("RGB")), self.labels[i]


def read_table(args):
    """The training table with absolute img_path and a fold column."""
    table = pd.read_csv(args.train_csv, dtype=str, keep_default_na=False)
    root = Path(args.train_csv).resolve().parent
    table["img_path"] = [str((root / p).resolve()) for p in table["img_path"]]
    if args.folds_csv:
        folds = pd.read_csv(args.folds_csv, dtype={"img_path": str, "artist": str}, keep_default_na=False)
        folds["img_path"] = [str((Path(args.folds_csv).resolve().parent / p).resolve()) for p in folds["img_path"]]
        table = table.merge(folds[["img_path", "fold"]], on="img_path", how="inner")
        if len(table) != len(folds):
            raise ValueError(f"{args.folds_csv}: {len(folds)} rows but {len(table)} match {args.train_csv}")
    else:
        from sklearn.model_selection import StratifiedKFold
        table["fold"] = -1
        for k, (_, valid) in enumerate(StratifiedKFold(4, shuffle=True, random_state=42).split(table, table["artist"])):
            table.loc[table.index[valid], "fold"] = k
    return table


def channel_stats(table, size):
    """Per-channel mean and std of the training images (resized to size), for Normalize."""
    tfm = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor()])
    total, sq, n = torch.zeros(3), torch.zeros(3), 0
    for p in table["img_path"]:
        x = tfm(Image.open(p).convert("RGB")).flatten(1)
        total, sq, n = total + x.sum(1), sq + (x ** 2).sum(1), n + x.shape[1]
    mean = total / n
    return mean.tolist(), (sq / n - mean ** 2).sqrt().tolist()


def evaluate(model, loader, loss_fn, device, tta=False):
    """(mean loss, probabilities) over a loader; with tta the softmax of the image and its flip are averaged."""
    model.eval()
    losses, probs = [], []
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            losses.append(loss_fn(logits, y).item() * len(y))
            p = logits.softmax(1)
            probs.append((p + model(x.flip(3)).softmax(1)) / 2 if tta else p)
    return sum(losses) / len(loader.dataset), torch.cat(probs).cpu().numpy()


def epochs_that_fit(seconds_left: float, epoch_s: float) -> int:
    """Total epochs (the first one done) that fit the seconds left, half an epoch kept for the final flip-TTA pass."""
    return 1 + max(0, int((seconds_left - 0.5 * epoch_s) // epoch_s))


def main(argv=None) -> int:
    """Train and score one fold into --out (result.json, oof.csv); a bad argument is a ValueError naming it."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-csv", required=True)
    p.add_argument("--folds-csv")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--arch", default="resnet18", choices=ARCHS)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--minutes", type=float, help="wall-time budget instead of --epochs: after the first epoch, the "
                   "epochs that fit at its pace (the cosine schedule re-aimed at them), the final flip-TTA included")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.minutes is not None and not args.minutes > 0:
        raise ValueError(f"--minutes {args.minutes}: need a positive number of minutes")
    start, out = time.time(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    table = read_table(args)
    classes = sorted(table["artist"].unique())
    train, valid = table[table["fold"] != args.fold], table[table["fold"] == args.fold]
    if train.empty or valid.empty:
        raise ValueError(f"fold {args.fold}: empty training or validation split")
    mean, std = channel_stats(train, args.size)
    train_tfm = T.Compose([T.RandomResizedCrop(args.size, scale=(0.35, 1)), T.RandomRotation(15),
                           T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    valid_tfm = T.Compose([T.Resize(args.size), T.CenterCrop(args.size), T.ToTensor(), T.Normalize(mean, std)])
    train_dl = DataLoader(CsvImages(train, classes, train_tfm), args.bs, shuffle=True, num_workers=args.workers,
                          generator=torch.Generator().manual_seed(args.seed))
    valid_dl = DataLoader(CsvImages(valid, classes, valid_tfm), args.bs * 2, num_workers=args.workers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = getattr(torchvision.models, args.arch)(weights=None, num_classes=len(classes)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    plan = {"epochs": args.epochs}  # with --minutes, re-set after the first epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: (1 + math.cos(math.pi * min(e, plan["epochs"])
                                                                           / plan["epochs"])) / 2)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    best, history = (float("inf"), 0, None), []
    epoch = 0
    while epoch < plan["epochs"]:
        epoch_start = time.time()
        model.train()
        train_losses, lr = [], opt.param_groups[0]["lr"]
        for x, y in train_dl:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            train_losses.append(loss.item())
        sched.step()
        train_loss = float(np.mean(train_losses))
        valid_loss, probs = evaluate(model, valid_dl, loss_fn, device)
        acc = float((probs.argmax(1) == np.array(valid_dl.dataset.labels)).mean())
        history.append(dict(epoch=epoch, lr=lr, train_loss=train_loss, valid_loss=valid_loss, valid_acc=acc))
        print(f"epoch {epoch}: train loss {train_loss:.4f}  valid loss {valid_loss:.4f}  valid acc {acc:.4f}",
              flush=True)
        if valid_loss < best[0]:
            best = (valid_loss, epoch, {k: v.clone() for k, v in model.state_dict().items()})
        if args.minutes is not None and epoch == 0:
            plan["epochs"] = epochs_that_fit(args.minutes * 60 - (time.time() - start), time.time() - epoch_start)
            print(f"budget: {plan['epochs']} epochs fit in {args.minutes:g} min at this pace", flush=True)
        epoch += 1
    model.load_state_dict(best[2])
    _, probs = evaluate(model, valid_dl, loss_fn, device, tta=True)
    pred = [classes[i] for i in probs.argmax(1)]
    oof = pd.DataFrame({"img_path": valid["img_path"].values, "fold": args.fold, "artist": valid["artist"].values,
                        "pred": pred})
    oof = pd.concat([oof, pd.DataFrame(probs, columns=[f"p_{c}" for c in classes])], axis=1)
    oof.to_csv(out / "oof.csv", index=False)
    result = dict(script="plain_torchvision", fold=args.fold, arch=args.arch, size=args.size, epochs=plan["epochs"],
                  minutes=args.minutes,
                  bs=args.bs, lr=args.lr, seed=args.seed, n_train=len(train), n_valid=len(valid),
                  accuracy=float(accuracy_score(valid["artist"], pred)),
                  f1_macro=float(f1_score(valid["artist"], pred, average="macro", zero_division=0)),
                  best_epoch=best[1], best_valid_loss=best[0], mean=mean, std=std, history=history,
                  seconds=time.time() - start, device=device, torch=torch.__version__,
                  torchvision=torchvision.__version__)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"fold {args.fold}: accuracy {result['accuracy']:.4f}  macro-F1 {result['f1_macro']:.4f}  "
          f"(best epoch {best[1]}, {result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    from artlearn.cli import run_cli  # the one-line error exit only: the training above uses no artlearn
    sys.exit(run_cli(main))
