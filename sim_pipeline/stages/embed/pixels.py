"""CLIPImageProcessor's resize, centre crop, rescale and normalise, bit for bit, at less cost.

The processor converts every image to numpy and back to PIL, then rescales in float64 and
normalises with two more full-size copies. Here the same PIL bicubic resize and the same crop run
on the PIL image, and rescale + normalise become one 256-entry lookup table per channel (a uint8
pixel has only 256 values). The output is identical to the processor's (tested), in about two
thirds of the time, so decoding steals less CPU from the model.

Only the configuration CLIP checkpoints use is replicated; any other returns ``None`` from
``FastClipPixels.matching`` and the processor itself is used.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class FastClipPixels:
    shortest_edge: int
    crop_height: int
    crop_width: int
    resample: int
    table: np.ndarray  # (3, 256) float32: the normalised value of each uint8 level per channel

    @classmethod
    def matching(cls, processor: Any) -> FastClipPixels | None:
        """The fast path for ``processor`` if it does exactly what this module replicates."""
        size, crop = dict(processor.size or {}), dict(processor.crop_size or {})
        steps = (processor.do_resize, processor.do_center_crop, processor.do_rescale,
                 processor.do_normalize)
        if (not all(steps) or getattr(processor, "do_pad", False)
                or set(size) != {"shortest_edge"} or set(crop) != {"height", "width"}
                or max(crop["height"], crop["width"]) > size["shortest_edge"]
                or not isinstance(processor.resample, int)
                or len(processor.image_mean) != 3 or len(processor.image_std) != 3):
            return None
        return cls(int(size["shortest_edge"]), int(crop["height"]), int(crop["width"]),
                   int(processor.resample),
                   _level_table(processor.rescale_factor, processor.image_mean,
                                processor.image_std))

    def __call__(self, images: Iterable[Image.Image]) -> np.ndarray:
        """``(N, 3, H, W)`` float32 pixel values, as ``processor(images)["pixel_values"]``.

        ``images`` may be a generator decoding one image at a time: each is dropped as soon as its
        pixels are taken, so a batch never holds its full-size images all at once.
        """
        rows = []
        for image in images:
            rows.append(self.pixels_of(image))
            del image  # before the generator decodes the next one, not after
        if not rows:
            return np.empty((0, 3, self.crop_height, self.crop_width), dtype=np.float32)
        return np.stack(rows)

    def pixels_of(self, image: Image.Image) -> np.ndarray:
        width, height = self.resized_size(*image.size)
        top, left = (height - self.crop_height) // 2, (width - self.crop_width) // 2
        resized = _as_rgb(image).resize((width, height), resample=self.resample)
        levels = np.asarray(resized.crop((left, top, left + self.crop_width,
                                          top + self.crop_height)))
        out = np.empty((3, self.crop_height, self.crop_width), dtype=np.float32)
        for channel in range(3):
            np.take(self.table[channel], levels[..., channel], out=out[channel])
        return out

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """Shortest edge to ``shortest_edge``, the other truncated, as transformers computes it."""
        short, long = sorted((width, height))
        new_long = int(self.shortest_edge * long / short)
        if width <= height:
            return self.shortest_edge, new_long
        return new_long, self.shortest_edge


def _as_rgb(image: Image.Image) -> Image.Image:
    """Plain RGB as is; anything else through transformers' own conversion (it composites
    transparency over white), so every mode gives the processor's pixels."""
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    from transformers.image_transforms import convert_to_rgb

    return Image.fromarray(convert_to_rgb(image, return_numpy=True))


def _level_table(scale: float, mean: list[float], std: list[float]) -> np.ndarray:
    """Each uint8 level rescaled in float64, cast to float32, then normalised in float32."""
    levels = (np.arange(256, dtype=np.float64) * scale).astype(np.float32)
    mean32, std32 = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    return ((levels[None, :] - mean32[:, None]) / std32[:, None]).astype(np.float32)


def pixel_values_function(processor: Any
                          ) -> Callable[[Iterable[Image.Image]], np.ndarray | dict[str, Any]]:
    """The fast path when it matches ``processor.image_processor``: the ``pixel_values`` array;
    else the checkpoint's processor itself, called as its reference computation calls it (its
    own defaults apply, e.g. SigLIP 2's patch budget): all of its model inputs."""
    image_processor = getattr(processor, "image_processor", processor)
    fast = FastClipPixels.matching(image_processor)
    if fast is not None:
        return fast
    return functools.partial(_one_at_a_time, processor)


def _one_at_a_time(processor: Any, images: Iterable[Image.Image]) -> dict[str, np.ndarray]:
    """The processor on each image in turn, outputs stacked: the same arrays as one call on the
    whole batch, without holding the batch's full-size images all at once."""
    parts = []
    for image in images:
        parts.append(dict(processor(images=[image], return_tensors="np")))
        del image  # before the generator decodes the next one, not after
    return {key: np.concatenate([part[key] for part in parts]) for key in (parts or [{}])[0]}
