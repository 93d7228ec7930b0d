"""CLIP preprocessing vs transformers' CLIPImageProcessor (release config), bad images."""

import io

import numpy as np
import pytest
from PIL import Image

from llamavid_jax.data import SampleError
from llamavid_jax.data import image as im
from tests import data_fixtures as fx


def _release_processor(size):
  """`CLIPImageProcessor` as configured by the release's clip-patch14-{size} json."""
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

  return CLIPImageProcessorPil(
      size=size, crop_size=size, do_center_crop=True, do_normalize=True, do_resize=True,
      image_mean=[0.48145466, 0.4578275, 0.40821073],
      image_std=[0.26862954, 0.26130258, 0.27577711], resample=3)


def _release_expand2square(img, color):
  w, h = img.size
  if w == h:
    return img
  out = Image.new(img.mode, (max(w, h),) * 2, color)
  out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
  return out


def _reference(img, size, aspect):
  """The release's training path: .convert('RGB'), expand2square, processor."""
  img = img.convert("RGB")
  if aspect == "pad":
    img = _release_expand2square(img, tuple(int(x * 255) for x in im.CLIP_MEAN))
  out = _release_processor(size)(img, return_tensors="np")["pixel_values"][0]
  return out.transpose(1, 2, 0)  # CHW -> HWC


CASES = [((37, 23), "RGB"), ((23, 61), "RGBA"), ((50, 17), "P"), ((15, 15), "L"),
         ((301, 225), "LA"), ((5, 9), "RGB")]


@pytest.mark.parametrize("aspect", ["pad", "crop"])
@pytest.mark.parametrize("wh,mode", CASES)
def test_matches_clip_image_processor(wh, mode, aspect):
  img = fx.random_image(np.random.default_rng(sum(wh)), *wh, mode=mode)
  assert img.mode == mode
  ours = im.preprocess_image(img, size=224, aspect=aspect)
  assert ours.shape == (224, 224, 3)
  mean, std = np.asarray(im.CLIP_MEAN), np.asarray(im.CLIP_STD)
  assert ((ours >= -mean / std - 1e-5) & (ours <= (1 - mean) / std + 1e-5)).all()   # pixels in [0, 1], normalised
  assert np.abs(ours - _reference(img, 224, aspect)).max() <= 1e-5


def test_matches_at_336():
  img = fx.random_image(np.random.default_rng(1), 40, 29, mode="RGBA")
  ours = im.preprocess_image(img, size=336)
  assert ours.shape == (336, 336, 3)
  assert np.abs(ours - _reference(img, 336, "pad")).max() <= 1e-5


def test_video_frames_match_processor():
  frames = np.random.default_rng(2).integers(0, 256, (3, 20, 31, 3), dtype=np.uint8)
  ref = _release_processor(224)(list(frames), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  ours = im.preprocess_frames(frames)
  assert ours.shape == (3, 224, 224, 3) and np.abs(ours - ref).max() <= 1e-5


def test_pad_colour_and_centering():
  img = Image.new("RGB", (4, 2), (255, 0, 0))
  sq = np.asarray(im.expand_to_square(img))
  assert im.PAD_COLOR == (122, 116, 104)
  assert sq.shape == (4, 4, 3)
  assert (sq[0] == (122, 116, 104)).all() and (sq[3] == (122, 116, 104)).all()
  assert (sq[1:3] == (255, 0, 0)).all()


def test_missing_image(tmp_path):
  path = str(tmp_path / "nope.png")
  with pytest.raises(SampleError) as e:
    im.load_image(path)
  assert (e.value.reason, e.value.field, e.value.path) == ("missing_file", "image", path)
  assert str(e.value) == f"field 'image' (file {path}): missing_file: file not found"


def test_truncated_image(tmp_path):
  buf = io.BytesIO()
  fx.random_image(np.random.default_rng(0), 40, 30).save(buf, format="PNG")
  path = tmp_path / "cut.png"
  path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
  with pytest.raises(SampleError) as e:
    im.load_image(str(path))
  assert (e.value.reason, e.value.field) == ("unreadable_image", "image")
  assert "truncated" in e.value.detail


def test_not_an_image(tmp_path):
  path = tmp_path / "junk.jpg"
  path.write_bytes(b"not an image at all")
  with pytest.raises(SampleError, match="unreadable_image: UnidentifiedImageError"):
    im.load_image(str(path))
