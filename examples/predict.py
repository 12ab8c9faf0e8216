"""Top-k artists for paintings from a trained run (its fold ensemble), and a Grad-CAM figure of why.

    python examples/predict.py runs/best painting.jpg other.png                # top-5 per painting
    python examples/predict.py runs/best painting.jpg --k 3 --tta multicrop --csv top3.csv
    python examples/predict.py runs/best painting.jpg --explain why.png [--artist NAME]

RUN is a run folder written by train_kfold (its selected folds are ensembled, as for the submission) or one
fold folder. With several paintings, --explain writes one figure per painting (OUT-<name>.png).
"""
import argparse
import os
import sys
from pathlib import Path

import pandas as pd

from artlearn.cli import fold_list, run_cli, tta_choices
from artlearn.ensemble import predict
from artlearn.files import atomic_write_csv
from artlearn.explain import explain
from artlearn.plots import save_figure
from artlearn.run import CONFIG_NAME, config_as_now, read_config


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="run folder (train_kfold's --out) or one fold folder")
    p.add_argument("images", nargs="+", type=Path, help="painting image files")
    p.add_argument("--k", type=int, default=5, help="artists listed per painting (default: 5)")
    p.add_argument("--tta", choices=tta_choices(),
                   help="test-time views, as Recipe.tta (default: the run's own, as its submission used: "
                   "config.json's tta; flip for a fold folder)")
    p.add_argument("--folds", help="comma-separated folds to ensemble (default: the run's selection)")
    p.add_argument("--csv", type=Path, help="also write the table (image,rank,artist,probability) here")
    p.add_argument("--explain", type=Path, help="save the Grad-CAM figure here (PNG)")
    p.add_argument("--artist", help="with --explain: explain this artist instead of the predicted one")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    return p.parse_args(argv)


def _figure_paths(out: Path, images: list) -> list:
    """OUT for one painting, OUT-<stem>.png for each of several."""
    if len(images) == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{Path(p).stem}{out.suffix or '.png'}") for p in images]


def recorded_tta(run: Path) -> str:
    """The test-time views a run scored and submitted with (its config.json's tta); 'flip' for a fold folder."""
    if not (run / CONFIG_NAME).is_file():
        return "flip"
    return config_as_now(read_config(run)).get("tta", "flip")


def check_output(flag: str, path: Path | None) -> None:
    """Refuse an output path that is a folder, or whose folder cannot be created or written, before predicting."""
    if path is None:
        return
    if path.is_dir():
        example = path / ("top.csv" if flag == "--csv" else "why.png")
        raise ValueError(f"{flag} {path} is a folder; give a file name (e.g. {example})")
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {probe} is not a folder this user can write; choose another place")


def main(argv=None) -> int:
    """Print the top-k table; write --csv and --explain when asked. Exit status 2 (one line on stderr) on a bad
    argument or a place that cannot be written."""
    return run_cli(_main, argv)


def _main(argv=None) -> int:
    """main's work (errors reported by run_cli)."""
    args = parse_args(argv)
    chosen = args.tta or recorded_tta(args.run)
    tta = None if chosen == "none" else chosen
    folds = fold_list(args.folds)
    check_output("--csv", args.csv)
    check_output("--explain", args.explain)
    images = [str(p) for p in args.images]
    table = predict(args.run, images, k=args.k, tta=tta, folds=folds, device=args.device)
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(table.to_string(index=False, formatters={"probability": "{:.1%}".format}))
    if args.csv:
        print(f"table: {atomic_write_csv(args.csv, table)}")
    if args.explain:
        for image, out in zip(images, _figure_paths(args.explain, images)):
            fig = explain(args.run, image, artist=args.artist, folds=folds, k=args.k, tta=tta, device=args.device)
            print(f"explain: {save_figure(fig, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
