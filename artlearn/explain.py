"""Why the ensemble names an artist: Grad-CAM over the selected folds, and a figure with the top-k bars.

`gradcam` works on one preprocessed image and any model with `forward_features`/`forward_head` (artlearn's
ResNets and ConvNeXts); `explain_map` averages it over a run's folds on exactly the ensemble's evaluation view;
`explain` draws the painting with the heatmap next to `predict`'s top-k bars, as a `matplotlib.figure.Figure`.
"""
import logging
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from .ensemble import load_folds, eval_crops, fold_stats, normalise, predict

__all__ = ["gradcam", "explain_map", "explain"]

logger = logging.getLogger("artlearn")


def _rescale(cam: np.ndarray) -> np.ndarray:
    """Min-max scaled to [0, 1]; a flat map (up to rounding) becomes ones where positive, else zeros."""
    lo, hi = float(cam.min()), float(cam.max())
    if hi - lo <= 1e-5 * max(abs(hi), abs(lo)) or hi == lo:
        return np.full(cam.shape, 1.0 if hi > 0 else 0.0, dtype=np.float32)
    return ((cam - lo) / (hi - lo)).astype(np.float32)


def _check_split_model(model) -> None:
    """ValueError unless the model exposes forward_features and forward_head."""
    if not (callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))):
        raise ValueError(f"gradcam needs a model with forward_features/forward_head (artlearn's ArtistResNet or "
                         f"ArtistConvNeXt, e.g. from load_fold); got {type(model).__name__}")


def _one_image(x):
    """(1, 3, H, W) from one preprocessed image tensor, (3, H, W) or (1, 3, H, W)."""
    x = x[None] if x.dim() == 3 else x
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"x has shape {tuple(x.shape)}: pass one preprocessed image, (3, H, W) or (1, 3, H, W)")
    return x


def _feature_grad(model, x, class_idx: int):
    """(feature map A, d logit[class_idx] / dA) of the last stage, the model in eval mode and no weight grads."""
    import torch
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False):
            with torch.no_grad():
                feats = model.forward_features(x).detach().float()
            feats.requires_grad_(True)
            with torch.enable_grad():
                logits = model.forward_head(feats)
                if not 0 <= class_idx < logits.shape[1]:
                    raise ValueError(f"class_idx={class_idx!r}: the model has {logits.shape[1]} classes "
                                     f"(0..{logits.shape[1] - 1})")
                (grad,) = torch.autograd.grad(logits[0, class_idx], feats)
    finally:
        model.train(was_training)
    return feats.detach(), grad


def gradcam(model, x, class_idx: int) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) of one preprocessed image for class `class_idx`: (H, W) numpy in [0, 1]."""
    # Our own lines on forward_features/forward_head: the grad-cam package is not an artlearn dependency, and the
    # split models give the last stage's feature map directly (no hooks to find or remove).
    import torch
    import torch.nn.functional as F
    _check_split_model(model)
    param = next(model.parameters(), None)
    x = _one_image(x).to(param.device if param is not None else x.device).float()
    feats, grad = _feature_grad(model, x, int(class_idx))
    if feats.shape[-2:] == (1, 1):
        logger.warning("gradcam: the feature map is 1x1 at %dx%d px input, so the map cannot localise; "
                       "use a model trained at >= 64 px", x.shape[-2], x.shape[-1])
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * feats).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]
    return _rescale(cam.cpu().numpy())


def _artist_index(artist, vocab: list) -> int:
    """Index of a named artist; ValueError naming it and a few valid names."""
    if str(artist) not in vocab:
        shown = ", ".join(repr(v) for v in vocab[:5]) + (", ..." if len(vocab) > 5 else "")
        raise ValueError(f"artist={artist!r} is not one of this run's {len(vocab)} artists ({shown}); name one of "
                         "them, or pass artist=None for the predicted artist")
    return vocab.index(str(artist))


def _predicted(models, xs) -> int:
    """Argmax of the folds' mean softmax on the plain view (ensemble with tta=None)."""
    import torch
    with torch.no_grad():
        probs = sum(model(x).float().softmax(1) for model, x in zip(models, xs)) / len(models)
    return int(probs.argmax(1)[0])


def explain_map(run, image, artist=None, folds=None, device=None) -> tuple[np.ndarray, np.ndarray, str]:
    """(Grad-CAM heatmap (s, s) in [0, 1] averaged over the folds, the evaluation crop uint8 (s, s, 3), artist)."""
    models, metas, device = load_folds(run, folds, device)
    vocab = list(metas[0].vocab)
    idx = _artist_index(artist, vocab) if artist is not None else None
    labels, crops = eval_crops(image, metas[0])
    if len(labels) != 1:
        raise ValueError(f"explain takes one image, got {len(labels)}: pass one path or one PIL image")
    xs = [normalise(crops.to(device), *fold_stats(m, device)) for m in metas]
    idx = _predicted(models, xs) if idx is None else idx
    heat = np.mean([gradcam(model, x, idx) for model, x in zip(models, xs)], axis=0)  # each fold weighs the same
    return _rescale(heat), crops[0].permute(1, 2, 0).numpy(), vocab[idx]


def _draw_overlay(ax, crop: np.ndarray, heat: np.ndarray, artist: str, alpha: float, cmap: str):
    """The painting with the heatmap on top, opaque only where the map is high (up to `alpha`), so the painting
    stays visible; returns the colour mapping for the colour bar."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    ax.imshow(crop)
    ax.imshow(heat, cmap=cmap, alpha=np.clip(heat, 0.0, 1.0) * alpha, vmin=0.0, vmax=1.0)
    ax.set_title(f"Grad-CAM: {artist}", fontsize=10)
    ax.set_axis_off()
    return ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap)


def _draw_painting(ax, crop: np.ndarray) -> None:
    """The painting as the model saw it (the evaluation crop)."""
    ax.imshow(crop)
    ax.set_title("the painting (model's view)", fontsize=10)
    ax.set_axis_off()


def _draw_bars(ax, top, artist: str, tta) -> None:
    """Horizontal top-k probability bars, rank 1 on top, the explained artist highlighted."""
    y = np.arange(len(top))
    colors = ["tab:orange" if a == artist else "tab:blue" for a in top["artist"]]
    ax.barh(y, top["probability"], color=colors)
    ax.set_yticks(y, top["artist"])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    for yi, p in zip(y, top["probability"]):
        ax.text(p + 0.01, yi, f"{p:.1%}", va="center", fontsize=8)
    ax.set_title(f"top-{len(top)} artists (tta={tta})", fontsize=10)


def explain(run, image, artist=None, folds=None, k: int = 5, tta=None, device=None, alpha: float = 0.7,
            cmap: str = "inferno") -> Figure:
    """Figure: the painting, Grad-CAM for the predicted (or named) artist over it (with a colour bar) and
    `predict`'s top-k bars; `alpha` is the heatmap's opacity where it is highest."""
    if isinstance(image, (list, tuple)) and len(image) != 1:
        raise ValueError(f"explain takes one image, got {len(image)}: pass one path or one PIL image")
    if artist is not None:  # an unknown name fails before any prediction
        heat, crop, target = explain_map(run, image, artist=artist, folds=folds, device=device)
    top = predict(run, image, k=k, tta=tta, folds=folds, device=device)
    if artist is None:
        heat, crop, target = explain_map(run, image, artist=top["artist"].iloc[0], folds=folds, device=device)
    fig = Figure(figsize=(12.0, 3.8), layout="constrained")
    ax_paint, ax_img, ax_bar = fig.subplots(1, 3, width_ratios=[1.0, 1.0, 1.3])
    _draw_painting(ax_paint, crop)
    mapping = _draw_overlay(ax_img, crop, heat, target, alpha, cmap)
    fig.colorbar(mapping, ax=ax_img, fraction=0.05, pad=0.02, label="Grad-CAM (0: none, 1: most)")
    _draw_bars(ax_bar, top, target, tta)
    fig.suptitle(Path(str(top["image"].iloc[0])).name, fontsize=9)
    return fig
