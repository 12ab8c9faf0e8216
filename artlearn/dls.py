"""`artist_dls`: fastai DataLoaders for one fold, built from a DataBlock with the stratified fold splitter; `eval_dls`
for a trained fold; both return `ArtistDataLoaders`, which carry the data's `DataMeta` and image store."""
import queue
import dataclasses
import random
import threading
import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from fastai.callback.data import WeightedDL
from fastai.data.core import DataLoaders, TfmdDL
from fastai.torch_core import TensorCategory, TensorImage
from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
from fastai.data.transforms import ColReader, IntToFloatTensor, Normalize, Transform
from fastai.vision.augment import aug_transforms
from fastai.vision.core import PILImage

from .augment import ArtistCrop, center_views, recipe_views
from .checkpoint import DataMeta, FoldMeta
from .device import default_workers, resolve_device
from .folds import StratifiedFoldSplitter, assign_folds, check_fold, fold_column
from .recipe import REFERENCE, Recipe
from .rng import keep_global_rng
from .store import PresizeCache, fold_store_side, store_presize
from .tables import ON_BAD_CHOICES, bad_images_message, check_images, normalise_labels


class ArtistDataLoaders(DataLoaders):
    """fastai DataLoaders (as `ImageDataLoaders` subclasses them) that also carry what a checkpoint records about the
    data (`data_meta`, a `DataMeta`) and the image store the loaders read (`cache`, a `PresizeCache`)."""

    def __init__(self, *loaders, path=".", device=None, data_meta: DataMeta | None = None,
                 cache: PresizeCache | None = None):
        super().__init__(*loaders, path=path, device=device)
        self.data_meta, self.cache = data_meta, cache

    @classmethod
    def wrap(cls, dls: DataLoaders, data_meta: DataMeta, cache: PresizeCache | None = None) -> "ArtistDataLoaders":
        """`dls`'s loaders (the same objects), path and device, with `data_meta` and `cache`."""
        return cls(*dls.loaders, path=dls.path, device=getattr(dls, "device", None), data_meta=data_meta, cache=cache)

    def new_empty(self) -> "ArtistDataLoaders":
        """fastai's empty copy (for export), keeping data_meta and cache."""
        empty = super().new_empty()
        empty.data_meta, empty.cache = self.data_meta, self.cache
        return empty


class CachedImage(Transform):
    """Path -> PILImage from a PresizeCache: training images decoded once; new images (predict) never stored."""

    def __init__(self, cache: PresizeCache):
        super().__init__()
        self.cache = cache

    def encodes(self, path):
        """The stored pixels of `path` as a PILImage."""
        return PILImage.create(self.cache.view(path))


class SeededWeightedDL(WeightedDL):
    """fastai's WeightedDL drawing from the loader's own seeded RNG instead of numpy's global one."""

    def get_idxs(self):
        """Training rows sampled with replacement in proportion to `wgts`."""
        if self.n == 0 or not self.shuffle:
            return super().get_idxs()
        rng = np.random.default_rng(self.rng.getrandbits(64))
        return list(rng.choice(self.n, self.n, p=self.wgts))


def prefetched(batches, depth: int):
    """Iterate `batches` (a generator) in a background thread, up to `depth` batches ahead, in the same order.

    The producer's exceptions are raised in the consumer; when the consumer stops early (a `break`, `one_batch`)
    the producer stops at its next batch. Not in fastai or torch: torch's DataLoader prefetches only with worker
    processes, which a store on the GPU cannot use.
    """
    slots, stop, done = queue.Queue(maxsize=depth), threading.Event(), object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for batch in batches:
                if not put((batch, None)):
                    return
            put((done, None))
        except BaseException as error:  # handed to the consumer, raised there
            put((None, error))

    worker = threading.Thread(target=produce, name="artlearn-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            batch, error = slots.get()
            if error is not None:
                raise error
            if batch is done:
                return
            yield batch
    finally:
        stop.set()
        worker.join()


EVAL_VIEW_BYTES = 512 << 20  # centre views one evaluation loader keeps (computed once, reused every epoch)


class StoreBatchDL(TfmdDL):
    """A fastai DataLoader that gathers whole batches from the image store by index and augments them on the device.

    The pattern of fastai's `TabDataLoader`: `do_item` passes the index through and `create_batch` builds the batch
    at once — the stored uint8 pixels of the batch (the store's own tensors, no copy, on the CPU or when the store
    fits the GPU; else a canvas of pinned host memory copied without blocking), then one resampling per image
    (`augment.recipe_views`: every data augmentation of the `recipe`; validation and test: `augment.center_views`). No
    worker processes, nothing restarted per epoch. The random draws come from a torch Generator seeded from the
    loader's own `rng` (shuffling, sampling and crops follow `Reproducible`'s seed). `wgts` samples training rows
    with replacement (balanced/sqrt). `prefetch=n` builds up to n batches ahead in a background thread (same
    batches, same order). Off by default: on a 2-core CPU it made 64 px epochs 1.4 s slower (most likely its torch
    ops competing with the model's).
    """

    def __init__(self, dataset=None, cache: PresizeCache | None = None, recipe: Recipe | None = None,
                 ratio=(3 / 4, 4 / 3), wgts=None, prefetch: int = 0, **kwargs):
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch={prefetch!r}: need a whole number of batches >= 0 (0: no prefetching)")
        self.cache, self.recipe, self.ratio, self.prefetch = cache, recipe or REFERENCE, tuple(ratio), prefetch
        self._views, self._views_of, self._view_bytes = {}, None, 0
        self.wgts = None if wgts is None else np.asarray(wgts, dtype=np.float64) / np.sum(wgts)
        kwargs["num_workers"] = 0  # the batch is gathered in the main process: no worker start-up per epoch
        super().__init__(dataset, **kwargs)

    @property
    def size(self) -> int:
        """The side of the views this loader makes (the recipe's `size`)."""
        return int(self.recipe.size)

    def new(self, dataset=None, cls=None, **kwargs):
        """A copy of this loader (e.g. `test_dl`) with the same store and recipe."""
        for name in ("cache", "recipe", "ratio", "prefetch"):
            kwargs.setdefault(name, getattr(self, name))
        if dataset is not None and dataset is not self.dataset:
            kwargs.setdefault("wgts", None)
        else:
            kwargs.setdefault("wgts", self.wgts)
        return super().new(dataset, cls, **kwargs)

    def get_idxs(self):
        """Training order: a seeded shuffle, or a seeded weighted draw with replacement when `wgts` is set."""
        if self.wgts is None or self.n == 0 or not self.shuffle:
            return super().get_idxs()
        rng = np.random.default_rng(self.rng.getrandbits(64))
        return list(rng.choice(self.n, self.n, p=self.wgts))

    def create_batches(self, samps):
        """fastai's batches, built `prefetch` batches ahead in a background thread when `prefetch` > 0."""
        batches = super().create_batches(samps)
        return prefetched(batches, self.prefetch) if self.prefetch else batches

    def do_item(self, s):
        """The sample index itself (the batch is gathered in `create_batch`)."""
        return 0 if s is None else s

    def _table(self) -> tuple:
        """(paths, labels tensor or None) of every dataset row, run through the dataset's pipelines once per
        dataset (as TabDataLoader reads a frame: per-item fastai transforms would cost as much as the crops)."""
        if getattr(self, "_table_of", None) is not self.dataset:
            rows = [self.dataset[i] for i in range(len(self.dataset))]
            labelled = bool(rows) and len(rows[0]) >= 2
            labels = torch.stack([torch.as_tensor(r[1]) for r in rows]) if labelled else None
            self._paths, self._labels, self._table_of = [r[0] for r in rows], labels, self.dataset
        return self._paths, self._labels

    def _center_batch(self, rows: list, paths: list, device) -> torch.Tensor:
        """Centre views (float 0..255) of dataset rows: each computed once (deterministic: same store pixels, same
        size) and kept up to EVAL_VIEW_BYTES, so validation epochs after the first only gather them. A row whose
        file changed since (its store version) is computed again; images never stored are never kept."""
        of = self._views_of
        if of is None or of[0] is not self.dataset or of[1] != self.size or of[2] is not self.cache:
            self._views, self._views_of, self._view_bytes = {}, (self.dataset, self.size, self.cache), 0
        todo = self._stale(rows, paths)
        fresh = center_views(*self.cache.gather([paths[rows[j]] for j in todo], device), self.size) if todo else None
        for j, view in zip(todo, fresh if fresh is not None else []):  # versions read after gather's re-decode
            self._keep_view(rows[j], self.cache.version(paths[rows[j]]), view)
        if len(todo) == len(rows):
            return fresh
        done = sorted(set(range(len(rows))) - set(todo))  # read before this batch's fresh views were kept
        kept = torch.stack([self._views[rows[j]][1] for j in done]).to(device=device, dtype=torch.float32)
        if not todo:
            return kept
        out = torch.empty((len(rows), *kept.shape[1:]), device=kept.device)
        out[torch.tensor(done, device=out.device)] = kept
        out[torch.tensor(todo, device=out.device)] = fresh
        return out

    def _stale(self, rows: list, paths: list) -> list:
        """Positions in `rows` without a kept view of their image's current store version."""
        return [j for j, i in enumerate(rows)
                if i not in self._views or self._views[i][0] != self.cache.version(paths[i])]

    def _keep_view(self, row: int, version, view: torch.Tensor) -> None:
        """Keep one row's centre view (replacing an outdated one) when its image is stored and the budget allows:
        as uint8 on the CPU (its views are whole numbers there: torch resizes uint8 directly), float elsewhere."""
        old = self._views.pop(row, None)
        if old is not None:
            self._view_bytes -= old[1].nbytes
        kept = view.to(torch.uint8) if view.device.type == "cpu" else view.clone()  # never a view of the batch
        if version is not None and kept.nbytes <= EVAL_VIEW_BYTES - self._view_bytes:
            self._views[row], self._view_bytes = (version, kept), self._view_bytes + kept.nbytes

    def create_batch(self, b):
        """(TensorImage float in 0..1 on the device[, TensorCategory]) for the dataset rows `b`."""
        paths, labels = self._table()
        device = self.device if self.device is not None else torch.device("cpu")
        if getattr(self.dataset, "split_idx", None) == 0:
            images, sizes = self.cache.gather([paths[i] for i in b], device)
            generator = torch.Generator(device=device).manual_seed(self.rng.getrandbits(63))
            x = recipe_views(images, sizes, self.recipe, generator, ratio=self.ratio)
        else:
            x = self._center_batch(list(b), paths, device)
        x = TensorImage(x.div_(255.0))
        if labels is None:
            return (x,)
        return x, TensorCategory(labels[torch.as_tensor(list(b), dtype=torch.long)].to(x.device))


def sample_weights(labels: pd.Series, sampler: str) -> np.ndarray:
    """Per-row sampling weights for class-balanced ('balanced') or square-root ('sqrt') sampling."""
    counts = labels.map(labels.value_counts()).to_numpy(dtype=np.float64)
    return 1.0 / counts if sampler == "balanced" else 1.0 / np.sqrt(counts)


def _prepare_table(df: pd.DataFrame, fold: int, n_folds: int | None, seed: int) -> tuple[pd.DataFrame, int]:
    """Validated training table with a fold column, and n_folds."""
    if not isinstance(df, pd.DataFrame) or "img_path" not in df.columns or "artist" not in df.columns:
        cols = list(df.columns) if isinstance(df, pd.DataFrame) else type(df).__name__
        raise ValueError(f"artist_dls needs a DataFrame with 'img_path' and 'artist' columns (got {cols}); "
                         "use read_artworks(train.csv)")
    if df.empty:
        raise ValueError("artist_dls: the table has no rows")
    df = normalise_labels(df, "table")
    if "fold" in df.columns:
        _, n = fold_column(df, fold, n_folds)
    else:
        n = 4 if n_folds is None else n_folds
        df = assign_folds(df, n, seed)
    check_fold(fold, n)
    return df.reset_index(drop=True), n


def fill_store(df: pd.DataFrame, cache: PresizeCache, on_bad: str) -> pd.DataFrame:
    """Decode every image into the store up front; unreadable ones raise (listed) or are dropped."""
    try:
        cache.fill(df["img_path"], source="training table")
        return df
    except ValueError:
        if on_bad == "raise":
            raise
    report = check_images(df[[p not in cache for p in df["img_path"]]])
    bad = report[~report["ok"]]
    warnings.warn(bad_images_message(bad, "training table") + f"; dropped {len(bad)} row(s)", stacklevel=3)
    keep = ~df["img_path"].isin(set(bad["img_path"]))
    df = df[keep].reset_index(drop=True)
    cache.fill(df["img_path"], source="training table")
    return df


def _artist_block(cache: PresizeCache, vocab: list, crop, splitter, batch_tfms: list) -> DataBlock:
    """The DataBlock of artlearn's loaders: stored image -> crop -> batch transforms, artist -> category."""
    return DataBlock(
        blocks=(TransformBlock(type_tfms=CachedImage(cache), batch_tfms=IntToFloatTensor), CategoryBlock(vocab=vocab)),
        get_x=ColReader("img_path"), get_y=ColReader("artist"), splitter=splitter, item_tfms=[crop],
        batch_tfms=batch_tfms)


def _store_block(vocab: list, splitter, normalize) -> DataBlock:
    """The DataBlock of the device pipeline: items stay paths (StoreBatchDL gathers the pixels), artist -> label."""
    return DataBlock(blocks=(TransformBlock(), CategoryBlock(vocab=vocab)), get_x=ColReader("img_path"),
                     get_y=ColReader("artist"), splitter=splitter, batch_tfms=[normalize])


def _all_valid(items):
    """Splitter of evaluation loaders: every item in the validation set (and, unused, in the training set)."""
    every = list(range(len(items)))
    return every, every


def eval_dls(meta: DataMeta, items: pd.DataFrame, bs: int = 64, cache: PresizeCache | None = None,
             device=None) -> ArtistDataLoaders:
    """Evaluation DataLoaders of a trained fold from its meta (`load_fold`'s FoldMeta, a DataMeta, or a parsed
    meta.json, validated): its vocab, size and normalisation.

    `items` (img_path[, artist]; at least one row, fastai infers its pipelines' types from a first item) become
    the validation set (for `validate`, `get_preds`, interpretation, and `predict`/`test_dl` of new paintings).
    Images are cropped to the fold's centre view, exactly as in training's validation.
    """
    if isinstance(meta, Mapping) and not isinstance(meta, DataMeta):
        meta = FoldMeta.from_json(dict(meta), "eval_dls: meta")  # a meta.json parsed by hand
    if not isinstance(meta, DataMeta):
        raise ValueError(f"eval_dls: meta must be a fold's FoldMeta (load_fold, read_meta) or a DataMeta, not "
                         f"{type(meta).__name__}")
    if meta.vocab is None or meta.size is None or meta.mean is None or meta.std is None:
        raise ValueError("eval_dls: the fold's meta does not record its vocab, size, mean and std")
    vocab, size = [str(v) for v in meta.vocab], int(meta.size)
    if not isinstance(items, pd.DataFrame) or "img_path" not in items.columns or items.empty:
        raise ValueError("eval_dls: items must be a non-empty DataFrame with an 'img_path' column")
    table = items.reset_index(drop=True)
    if "artist" not in table.columns:
        table = table.assign(artist=vocab[0])
    unknown = sorted(set(table["artist"].astype(str)) - set(vocab))
    if unknown:
        raise ValueError(f"items: artists {unknown[:5]} are not in this fold's vocabulary ({len(vocab)} artists)")
    cache = cache if cache is not None else PresizeCache(fold_store_side(meta))
    cache.fill(table["img_path"], source="items")
    device = resolve_device(device)
    normalize = Normalize.from_stats(list(meta.mean), list(meta.std), cuda=device.type == "cuda")
    kwargs = dict(bs=bs, device=device)
    if meta.pipeline == "device":
        block = _store_block(vocab, _all_valid, normalize)
        kwargs.update(dl_type=StoreBatchDL, cache=cache, recipe=REFERENCE.override(size=size))
    else:
        block = _artist_block(cache, vocab, ArtistCrop(size), _all_valid, [normalize])
        kwargs.update(num_workers=0)
    with keep_global_rng():
        dls = block.dataloaders(table, **kwargs)
    return ArtistDataLoaders.wrap(dls, dataclasses.replace(meta.data(), store_side=cache.presize), cache)


def data_recipe(recipe: Recipe | None = None, **settings) -> Recipe:
    """The validated recipe a loader uses: `recipe` (default `Recipe()`, the reference) with data settings given by
    name (None: the recipe's); a setting of another stage is a ValueError naming the function it belongs to."""
    recipe = recipe if recipe is not None else REFERENCE
    others = sorted(k for k in settings if k in Recipe.names() and recipe.consumer(k) != "artist_dls")
    if others:
        raise ValueError(f"{others} are not data settings; pass them to {recipe.consumer(others[0])} (or give the "
                         "whole recipe=)")
    return recipe.replace(**settings).validate()


def artist_dls(df: pd.DataFrame, fold: int = 0, size: int | None = None, bs: int | None = None, *,
               recipe: Recipe | None = None, n_folds: int | None = None, seed: int = 42,
               cache: PresizeCache | None = None, workers: int | None = None, ratio=(3 / 4, 4 / 3), device=None,
               on_bad: str = "raise", **settings):
    """fastai DataLoaders for one fold: DataBlock(ImageBlock, CategoryBlock) + StratifiedFoldSplitter.

    The data settings come from `recipe` (default `Recipe()`, the reference recipe), whole; `size`, `bs` and any
    other data setting given by name (`min_scale=0.35`, `colour_jitter=0.2`, ...) override it.
    pipeline='device' (default): `StoreBatchDL` gathers each batch from the store and makes the recipe's training
    views (crop, rotation, flip, ...) in one resampling per image on the device. pipeline='items' (fastai's
    per-item pipeline, kept for runs trained with it): RandomResizedCrop at `size` per item (PIL), then flip and
    rotation as batch transforms. Validation: the centre square resized to
    `size`. Both normalised with the training split's own per-channel mean/std (nothing is pretrained, so no
    ImageNet statistics). Images come from a PresizeCache, decoded once and shared by every epoch and fold; without
    one, `store` picks its shorter side (`store_presize`: 'crop' keeps a min_scale crop at `size` pixels or more).
    """
    recipe = data_recipe(recipe, size=size, bs=bs, **settings)
    if on_bad not in ON_BAD_CHOICES:
        raise ValueError(f"on_bad={on_bad!r}: use 'raise' or 'drop'")
    size, bs, min_scale = recipe.size, recipe.bs, recipe.min_scale
    df, n_folds = _prepare_table(df, fold, n_folds, seed)
    cache = cache if cache is not None else PresizeCache(store_presize(recipe.store, size, min_scale, len(df)))
    df = fill_store(df, cache, on_bad)
    splitter = StratifiedFoldSplitter(fold, n_folds, seed)
    train_idx, valid_idx = splitter(df)
    if not train_idx or not valid_idx:
        raise ValueError(f"fold {fold} leaves an empty training or validation split ({len(train_idx)} / "
                         f"{len(valid_idx)} rows); use fewer folds")
    mean, std = cache.channel_stats(df["img_path"].iloc[train_idx])
    vocab = sorted(df["artist"].unique())
    device = resolve_device(device)
    normalize = Normalize.from_stats(mean, std, cuda=device.type == "cuda")
    if recipe.pipeline == "device":
        block = _store_block(vocab, splitter, normalize)
        kwargs = dict(bs=bs, device=device, dl_type=StoreBatchDL, cache=cache, recipe=recipe, ratio=ratio)
    else:
        augment = aug_transforms(do_flip=recipe.flip, max_rotate=recipe.max_rotate, min_zoom=1.0, max_zoom=1.0,
                                 max_lighting=0.0, max_warp=0.0, p_affine=0.75)
        block = _artist_block(cache, vocab, ArtistCrop(size, min_scale, ratio), splitter, [*augment, normalize])
        workers = default_workers() if workers is None else workers
        kwargs = dict(bs=bs, num_workers=workers, device=device, pin_memory=device.type == "cuda")
        if recipe.sampler is not None:
            kwargs["dl_type"] = SeededWeightedDL
    train_kw = {}
    if len(train_idx) < bs:  # fastai drops the incomplete last training batch: nothing would be trained
        warnings.warn(f"fold {fold}: the training split has {len(train_idx)} rows, fewer than bs={bs}; each epoch "
                      "trains on one partial batch (lower bs, or use fewer folds)", stacklevel=2)
        train_kw["drop_last"] = False
    with keep_global_rng():  # building loaders runs transforms and seeds fastai's RNGs from the global ones
        if recipe.sampler is not None:
            train_kw["wgts"] = sample_weights(df["artist"], recipe.sampler)[train_idx]
        dls = block.dataloaders(df, dl_kwargs=[train_kw, {}], **kwargs)
    dls.train.rng = random.Random(seed)
    counts = df["artist"].iloc[train_idx].value_counts().reindex(vocab, fill_value=0)
    meta = DataMeta(vocab=[str(v) for v in vocab], size=int(size), mean=mean, std=std, fold=int(fold),
                    class_counts=[int(c) for c in counts], n_folds=int(n_folds), split_seed=int(seed),
                    pipeline=recipe.pipeline, store_side=cache.presize)
    return ArtistDataLoaders.wrap(dls, meta, cache)
