"""Captioned image datasets: the synthetic set, a local imagefolder, or a Hub dataset id.

`load_captioned_dataset` returns a `datasets.Dataset` with the user's image and caption columns
checked; `make_train_transform` turns rows into the tensors training needs (pixel values in
[-1, 1] and caption ids padded to the tokenizer's max length, as at inference).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError

SYNTHETIC = "synthetic"


def load_captioned_dataset(
    name: str = SYNTHETIC,
    image_column: str = "image",
    caption_column: str = "text",
    split: str = "train",
    max_samples: int | None = None,
    synthetic_size: int = 1000,
    synthetic_resolution: int = 64,
    seed: int = 0,
    config_name: str | None = None,
):
    """Load a captioned dataset.

    `name` is "synthetic" (or "synthetic:N" for N samples), a local folder in `imagefolder` layout
    with metadata.jsonl / metadata.csv, or a Hub dataset id such as
    `lambdalabs/pokemon-blip-captions` (needs network)."""
    import datasets

    if name == SYNTHETIC or name.startswith(SYNTHETIC + ":"):
        from ..assets.synthetic import make_synthetic_dataset

        n = synthetic_size
        if ":" in name:
            try:
                n = int(name.split(":", 1)[1])
            except ValueError:
                raise UserError(
                    f"dataset {name!r}: write synthetic:N with N a whole number, e.g. synthetic:500"
                ) from None
        ds = make_synthetic_dataset(n, seed=seed, resolution=synthetic_resolution)
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
        if not any((folder / f).is_file() for f in ("metadata.jsonl", "metadata.csv")) and not any(
            folder.glob("*/metadata.*")
        ):
            raise UserError(
                f"dataset folder {name!r} has no metadata.jsonl or metadata.csv; add one with a file_name "
                f"column and a caption column (see the datasets imagefolder docs)"
            )
        ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split=split)
    elif Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        raise UserError(f"dataset path {name!r} does not exist or is not a folder; pass an imagefolder or a Hub id")
    else:
        try:
            ds = datasets.load_dataset(name, config_name, split=split)
        except Exception as e:  # network down, unknown id, gated set: all surface the same way
            raise UserError(
                f"could not load dataset {name!r} from the Hub ({type(e).__name__}: {e}".splitlines()[0] + ")"
            ) from None
    missing = [c for c in (image_column, caption_column) if c not in ds.column_names]
    if missing:
        raise UserError(
            f"dataset {name!r} has no column {missing[0]!r} (columns found: {ds.column_names}); "
            f"set image_column / caption_column"
        )
    if max_samples is not None:
        if max_samples < 1:
            raise UserError(f"max_samples must be >= 1, got {max_samples}")
        ds = ds.select(range(min(max_samples, len(ds))))
    return ds


def drop_unreadable_images(ds, image_column: str):
    """Skip rows whose image file is missing, truncated or not an image; say how many.

    Checks each file's header and data with PIL's `verify()` (no full decode), so a corrupt file is
    caught here instead of crashing a training run hours in. Returns (dataset, skipped count)."""
    import io
    import logging

    import datasets
    from PIL import Image

    feature = ds.features.get(image_column)
    if not isinstance(feature, datasets.Image):
        return ds, 0
    raw = ds.cast_column(image_column, datasets.Image(decode=False))
    bad = []
    for i, value in enumerate(raw[image_column]):
        try:
            src = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
            with Image.open(src) as im:
                im.verify()
        except Exception:
            bad.append(i)
    if len(bad) == len(ds):
        raise UserError(f"none of the {len(ds)} images in column {image_column!r} can be read; check the files")
    if bad:
        logging.getLogger(__name__).warning(
            "skipped %d unreadable image(s) of %d (first at row %d)", len(bad), len(ds), bad[0]
        )
        keep = sorted(set(range(len(ds))) - set(bad))
        ds = ds.select(keep)
    return ds, len(bad)


def check_captions(ds, caption_column: str) -> None:
    """Reject empty captions: SD would learn the unconditional prompt from them by accident."""
    empty = [i for i, t in enumerate(ds[caption_column]) if not isinstance(t, str) or not t.strip()]
    if empty:
        raise UserError(
            f"{len(empty)} empty caption(s) in column {caption_column!r} (first at row {empty[0]}); "
            "fill or drop them before training"
        )


INDEX_COLUMN = "__row"  # added by prepare_dataset: seeds each row's augmentation


class Augmentation:
    """Random crop and flip drawn from a generator seeded by (seed, epoch, row), not torch's global RNG.

    That makes a resumed run see exactly the crops and flips an uninterrupted one would: Trainer
    skips the batches it already trained on without loading them, so a global RNG stream would
    shift. `epoch` is set by the trainer at each epoch start."""

    def __init__(self, seed: int):
        self.seed = seed
        self.epoch = 0

    def generator(self, row: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + row)


def tokenize(tokenizer, captions) -> torch.Tensor:
    """Caption ids [N,77], padded to the tokenizer's max length as at inference (SD's text encoder always sees 77
    tokens)."""
    return tokenizer(
        list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids  # fmt: skip


def make_train_transform(tokenizer, resolution: int, center_crop: bool, random_flip: bool, image_column: str,
                         caption_column: str, augmentation: Augmentation | None = None, tokenizer_2=None):  # fmt: skip
    """A `Dataset.with_transform` function: rows -> pixel_values [B,3,H,W] in [-1,1], input_ids [B,77]; with SDXL's
    second tokenizer also input_ids_2 [B,77], original_size [B,2] (height, width before resizing) and crop_top_left
    [B,2] (the crop's offsets in the resized image, counted as if flipped first), as train_text_to_image_sdxl.py
    gives its UNet's time ids."""
    from torchvision.transforms import functional as TF

    augmentation = augmentation or Augmentation(0)

    def image_tf(img, row: int):
        original = (img.height, img.width)
        x = TF.to_tensor(TF.resize(img.convert("RGB"), resolution, interpolation=TF.InterpolationMode.BILINEAR))
        g = augmentation.generator(row)
        h, w = x.shape[-2:]
        if center_crop:
            top, left = (h - resolution) // 2, (w - resolution) // 2
        else:
            top = int(torch.randint(0, h - resolution + 1, (1,), generator=g))
            left = int(torch.randint(0, w - resolution + 1, (1,), generator=g))
        x = x[:, top : top + resolution, left : left + resolution]
        if random_flip and torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
            left = w - resolution - left
        return x * 2 - 1, torch.tensor(original), torch.tensor((top, left))

    def transform(batch):
        rows = batch.get(INDEX_COLUMN) or list(range(len(batch[image_column])))
        images, original, crop = zip(*[image_tf(img, r) for img, r in zip(batch[image_column], rows)], strict=True)
        out = {"pixel_values": list(images), "input_ids": list(tokenize(tokenizer, batch[caption_column]))}
        if tokenizer_2 is not None:
            out.update(input_ids_2=list(tokenize(tokenizer_2, batch[caption_column])), original_size=list(original),
                       crop_top_left=list(crop))  # fmt: skip
        return out

    return transform


def collate(rows):
    """Training rows (pixel_values, input_ids) or teacher-gap rows (sample, timestep, ...): stack every tensor."""
    return {k: torch.stack([r[k] for r in rows]).contiguous() for k in rows[0] if isinstance(rows[0][k], torch.Tensor)}
