"""Video decoding: the release's 1-fps frame choice on generated clips whose frames
carry their index, seeking == sequential decoding, the frame cap, VFR, bad files."""

import math
from fractions import Fraction

import av
import numpy as np
import pytest

from llamavid_jax.data import SampleError, media, sources
from llamavid_jax.data.video import VideoError, frame_indices, load_video
from llamavid_jax.models.config import InputSpec
from tests.video_fixtures import read_counter, write_counter_clip

RATES = {"24": 24, "25": 25, "30": 30, "29.97": Fraction(30000, 1001)}
SPEC = InputSpec(tokens_per_frame=2, image_size=16, feature_shape=(5, 8))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  root = tmp_path_factory.mktemp("clips")
  return {k: write_counter_clip(str(root / f"{k}.mp4"), 250, r) for k, r in RATES.items()}


@pytest.mark.parametrize("rate,step", [("24", 24), ("25", 25), ("30", 30), ("29.97", 30)])
def test_one_fps_picks_every_round_avg_fps_th_frame(clips, rate, step):
  want = list(range(0, 250, step))             # decord: range(0, len(vr), round(avg_fps))
  for seek in (False, True):
    frames, info = load_video(clips[rate], fps=1.0, seek=seek)
    assert info["indices"] == want and info["num_frames"] == 250
    assert [read_counter(f) for f in frames] == want
    assert frames.shape == (len(want), 48, 64, 3)
    assert frames.max() >= 240 and frames.min() <= 15     # full-range RGB (not limited-range 16..235 levels)


def test_seeking_and_sequential_decoding_give_identical_frames(clips):
  a, ia = load_video(clips["30"], fps=1.0, seek=False)
  b, ib = load_video(clips["30"], fps=1.0, seek=True)
  np.testing.assert_array_equal(a, b)
  assert ib["decoded"] < ia["decoded"]         # seeking skips most of the decoding
  assert load_video(clips["30"], fps=1.0)[1]["seek"]   # auto: frames 30 apart, keyframes 12 apart


@pytest.mark.parametrize("name,codec,bframes", [
    ("b.mp4", "libx264", 3), ("b.mkv", "libx264", 3), ("b.webm", "libvpx-vp9", 0), ("b.mov", "mpeg4", 2),
    ("h264.avi", "libx264", 3), ("mpeg4.avi", "mpeg4", 2)])
def test_containers_and_b_frames(tmp_path, name, codec, bframes):
  # AVI has no presentation stamps (PyAV reports decode-order ones, out of order with
  # B-frames): frames are counted off the decoder there, never sought by pts.
  path = write_counter_clip(str(tmp_path / name), 100, 25, gop=25, codec=codec, bframes=bframes)
  for seek in (False, True):
    frames, info = load_video(path, fps=5.0, seek=seek)
    assert info["num_frames"] == 100 and info["indices"] == list(range(0, 100, 5))
    assert [read_counter(f) for f in frames] == info["indices"], (name, seek)
    assert info["seek"] == (seek and not name.endswith(".avi"))


def test_other_rates_and_every_frame(clips):
  frames, info = load_video(clips["25"], fps=2.0)    # step round(25 / 2) = 12
  assert [read_counter(f) for f in frames] == list(range(0, 250, 12))
  frames, _ = load_video(clips["24"], fps=None)
  assert [read_counter(f) for f in frames] == list(range(250))


def test_frame_cap_resamples_uniformly(clips):
  frames, info = load_video(clips["30"], fps=1.0, max_frames=4)
  # 9 one-fps frames [0, 30, ..., 240] -> linspace(0, 8, 4).round() = [0, 3, 5, 8]
  assert info["indices"] == [0, 90, 150, 240] == [read_counter(f) for f in frames]
  assert frame_indices(9, 1.0, 1.0, 9) == list(range(9))


def test_variable_frame_rate_counts_frames_in_presentation_order(tmp_path):
  gaps = np.where(np.arange(120) % 2, 20, 60)          # 50 fps and 16.7 fps alternating
  pts = np.concatenate([[0], np.cumsum(gaps)[:-1]])
  path = write_counter_clip(str(tmp_path / "vfr.mp4"), 120, 25, pts=pts)
  frames, info = load_video(path, fps=1.0)
  step = max(1, round(info["avg_fps"]))
  assert info["indices"] == list(range(0, 120, step)) == [read_counter(f) for f in frames]
  np.testing.assert_allclose(info["timestamps"], pts[info["indices"]] / 1000, atol=1e-6)


def test_bad_files_name_the_file_and_reason(tmp_path):
  missing = str(tmp_path / "nope.mp4")
  with pytest.raises(VideoError, match="nope.mp4.*file not found") as e:
    load_video(missing)
  assert (e.value.reason, e.value.field, e.value.detail) == ("missing_file", "video", "file not found")
  junk = tmp_path / "junk.mp4"
  junk.write_bytes(b"this is not a video" * 10)
  with pytest.raises(VideoError, match="junk.mp4.*cannot open") as e:
    load_video(str(junk))
  assert e.value.reason == "unreadable_video" and e.value.detail.startswith("cannot open: ")
  empty = str(tmp_path / "empty.mp4")
  with av.open(empty, "w") as out:              # a header without frames
    s = out.add_stream("mpeg4", rate=4)
    s.width, s.height, s.pix_fmt = 32, 24, "yuv420p"
    out.start_encoding()
  with pytest.raises(VideoError, match="empty.mp4.*(no frames|no video stream)") as e:
    load_video(empty)
  assert (e.value.reason, e.value.detail) == ("no_video_stream", "no video stream")  # mp4: no track
  empty_avi = str(tmp_path / "empty.avi")
  with av.open(empty_avi, "w") as out:          # AVI keeps the stream: a stream without frames
    s = out.add_stream("mpeg4", rate=4)
    s.width, s.height, s.pix_fmt = 32, 24, "yuv420p"
    out.start_encoding()
  with pytest.raises(VideoError, match="empty.avi.*no frames") as e:
    load_video(empty_avi)
  assert (e.value.reason, e.value.detail) == ("empty_video", "no frames")
  audio = str(tmp_path / "audio.mp4")
  with av.open(audio, "w") as out:
    s = out.add_stream("aac", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    frame.sample_rate = 8000
    for p in s.encode(frame):
      out.mux(p)
    for p in s.encode():
      out.mux(p)
  with pytest.raises(VideoError, match="audio.mp4.*no video stream") as e:
    load_video(audio)
  assert (e.value.reason, e.value.detail) == ("no_video_stream", "no video stream")
  # The pipeline's decoder passes the tags through unchanged, naming the file.
  for path, reason in [(missing, "missing_file"), (str(junk), "unreadable_video"), (audio, "no_video_stream")]:
    with pytest.raises(VideoError) as e:
      media.decode(sources.RawSample(0, "v", None, "video", path), SPEC)
    assert (e.value.reason, e.value.field, e.value.path) == (reason, "video", path)
  # ... and planning's probe gives the same tags.
  for path, reason in [(missing, "missing_file"), (str(junk), "unreadable_video"), (empty, "no_video_stream"),
                       (empty_avi, "empty_video"), (audio, "no_video_stream")]:
    with pytest.raises(SampleError) as e:
      sources.probe_video(path)
    assert (e.value.reason, e.value.field, e.value.path) == (reason, "video", path)


@pytest.mark.parametrize("avg_fps", [23.976, 24, 25, 29.97, 30, 60])
def test_planned_frame_count_is_the_decoders(avg_fps):
  """Planning's count from container metadata (`sources.sampled_frame_count`) is the
  number of frames the decoder picks (`frame_indices`), and both are the release's:
  ceil(n / round(avg_fps / fps)) frames, capped at max_frames."""
  for n in [*range(0, 130), 299, 300, 301, 1799, 1800, 1801, 9001, 36000]:
    for fps in (None, 1.0, 0.5):
      step = 1 if fps is None else max(1, round(avg_fps / fps))
      for max_frames in (None, 4, 300):
        idx = frame_indices(n, avg_fps, fps, max_frames)
        want = min(math.ceil(n / step), max_frames or n)
        assert sources.sampled_frame_count(n, avg_fps, fps, max_frames) == len(idx) == want, (n, fps, max_frames)
        assert idx == sorted(set(idx)) and all(0 <= i < n and i % step == 0 for i in idx)
        assert idx[:1] == ([0] if n else [])
