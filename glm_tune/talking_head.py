"""The talking head's pictures and video (APP_example/digital_human/): where the face is in a portrait, an idle
animation of it (a small head sway and nod, periodic blinks), a mouth that opens with the voice's loudness, frame
by frame, and the mux of those frames with the voice into an H.264 + AAC .mp4.

Everything here is parametric drawing over one still portrait, on the CPU, in a few seconds: the offline stand-in
for MuseV (motion) and MuseTalk (lip-sync), which glm_tune.digital_human can call instead.

    face box (detect_face) ──> eyes and mouth placed by the proportions of a face (FaceBox.eyes, .mouth)
    t ──> head_pose(t): an affine transform (sway = a rotation about the chin, nod = a vertical shift)
    t ──> blink(t): how far the eyelids are closed, 0..1
    loudness envelope (one value per frame, 0..1) ──> mouth opening in pixels (mouth_openings)

Video goes through imageio-ffmpeg's bundled ffmpeg (no system ffmpeg, no ffprobe), always to a temporary file that
is renamed when complete, so that an interrupted run never leaves a partial .mp4 under the real name.
"""

import math
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from glm_tune.atomic import atomic_path
from glm_tune.errors import UserError, first_line

FACE_CASCADE = "haarcascade_frontalface_default.xml"
INTERMEDIATE_CRF = "12"  # motion.mp4 and lipsync.mp4 are read again: nearly lossless
FINAL_CRF = "20"
MOUTH_COLOUR = (70, 12, 24)  # the inside of an open mouth, dark red
LIP_COLOUR = (150, 55, 60)


# -- the face ---------------------------------------------------------------------------------------------------------

@dataclass
class FaceBox:
    """A face's box in portrait pixels, how it was found ("detected", or "centred": the fallback) and why the
    fallback was needed. The eyes and mouth are placed by a face's usual proportions inside the box."""

    x: int
    y: int
    w: int
    h: int
    source: str = "detected"
    reason: str | None = None

    def eyes(self):
        """((cx, cy), (cx, cy), (half width, half height)) of the two eyes."""
        cy = self.y + 0.40 * self.h
        size = (max(2, round(0.11 * self.w)), max(1, round(0.06 * self.h)))
        return (self.x + 0.32 * self.w, cy), (self.x + 0.68 * self.w, cy), size

    def mouth(self):
        """((cx, cy), half width, the widest opening in pixels) of the mouth."""
        return (self.x + 0.5 * self.w, self.y + 0.76 * self.h), max(3, round(0.18 * self.w)), max(2.0, 0.16 * self.h)

    def to_json(self):
        return asdict(self)


def centred_box(width, height, reason):
    """The fallback: a face half the picture's shorter side wide, centred a little above the middle (where a
    portrait's face usually is)."""
    side = min(width, height) // 2
    return FaceBox((width - side) // 2, max(0, round(height * 0.42 - side / 2)), side, round(side * 1.15),
                   source="centred", reason=reason)


def detect_face(image):
    """The largest frontal face in `image` (PIL or RGB array) by OpenCV's shipped Haar cascade; the centred box
    (with the reason) when none is found or this OpenCV has no cascades (OpenCV 5 moved them out of the main
    package: opencv-python-headless 4.x has them)."""
    import cv2

    rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    height, width = rgb.shape[:2]
    cascade_dir = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if not hasattr(cv2, "CascadeClassifier") or not cascade_dir or not (Path(cascade_dir) / FACE_CASCADE).is_file():
        return centred_box(width, height, f"OpenCV {cv2.__version__} has no Haar face cascade")
    cascade = cv2.CascadeClassifier(str(Path(cascade_dir) / FACE_CASCADE))
    grey = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    faces = cascade.detectMultiScale(grey, scaleFactor=1.05, minNeighbors=5, minSize=(max(24, width // 10),) * 2)
    if len(faces) == 0:
        return centred_box(width, height, "no face found by OpenCV's frontal-face cascade")
    x, y, w, h = max(faces, key=lambda box: box[2] * box[3])
    return FaceBox(int(x), int(y), int(w), int(h))


def skin_colour(rgb, face):
    """The median colour of the cheeks (between the eyes and the mouth), for eyelids drawn over the eyes."""
    y0, y1 = int(face.y + 0.5 * face.h), int(face.y + 0.62 * face.h)
    x0, x1 = int(face.x + 0.2 * face.w), int(face.x + 0.8 * face.w)
    patch = rgb[max(0, y0):max(y0 + 1, y1), max(0, x0):max(x0 + 1, x1)].reshape(-1, 3)
    return tuple(int(v) for v in np.median(patch, axis=0)) if len(patch) else (200, 160, 140)


# -- the motion -------------------------------------------------------------------------------------------------------

@dataclass
class Motion:
    """The idle animation's parameters. The periods are far from multiples of each other, so that the sway, nod and
    drift never line up into a visible loop."""

    sway_degrees: float = 2.0
    nod_fraction: float = 0.012  # of the picture's height
    blink_every_s: float = 3.2
    blink_s: float = 0.18
    seed: int = 0


def head_pose(t, motion, size):
    """(angle in degrees, dx, dy) at time `t` seconds: a slow sway, a faster small nod, a slow sideways drift."""
    phase = np.random.default_rng(motion.seed).uniform(0, 2 * math.pi, 3)
    nod = motion.nod_fraction * size[1]
    return (motion.sway_degrees * math.sin(2 * math.pi * t / 4.3 + phase[0]),
            0.5 * nod * math.sin(2 * math.pi * t / 5.7 + phase[1]),
            nod * math.sin(2 * math.pi * t / 2.9 + phase[2]))


def pose_matrix(t, motion, face, size):
    """The 2x3 affine matrix of head_pose(t): a rotation about the chin, then the shift."""
    import cv2

    angle, dx, dy = head_pose(t, motion, size)
    matrix = cv2.getRotationMatrix2D((face.x + face.w / 2, face.y + face.h), angle, 1.0)
    matrix[:, 2] += (dx, dy)
    return matrix


def blink(t, motion):
    """How far the eyelids are closed at `t`, 0..1: a quick close and open every blink_every_s (the first after
    one second), its timing jittered by the seed so that blinks are not a metronome."""
    jitter = np.random.default_rng(motion.seed + 1).uniform(-0.6, 0.6, 64)
    start, k = 1.0, 0
    while start <= t and k < len(jitter):
        if t < start + motion.blink_s:
            return math.sin(math.pi * (t - start) / motion.blink_s)
        start += motion.blink_every_s + jitter[k]
        k += 1
    return 0.0


def draw_eyelids(rgb, face, closed, colour):
    """Eyelids over both eyes, closed by `closed` (0..1) from the top, with a dark lash line at their edge."""
    import cv2

    if closed <= 0.02:
        return rgb
    left, right, (half_w, half_h) = face.eyes()
    for cx, cy in (left, right):
        top = cy - 1.6 * half_h
        edge = top + closed * 2.8 * half_h
        x0, x1 = int(cx - 1.3 * half_w), int(cx + 1.3 * half_w)
        cv2.rectangle(rgb, (x0, int(top)), (x1, int(edge)), colour, -1)
        cv2.line(rgb, (x0, int(edge)), (x1, int(edge)), (40, 30, 30), max(1, half_h // 3))
    return rgb


def motion_frames(portrait, face, count, fps, motion):
    """`count` RGB frames of the portrait with blinks and the head's idle motion; also yields each frame's affine
    matrix (lip-sync places the mouth by it)."""
    import cv2

    base = np.ascontiguousarray(np.asarray(portrait.convert("RGB")))
    height, width = base.shape[:2]
    colour = skin_colour(base, face)
    for index in range(count):
        t = index / fps
        frame = draw_eyelids(base.copy(), face, blink(t, motion), colour)
        matrix = pose_matrix(t, motion, face, (width, height))
        yield cv2.warpAffine(frame, matrix, (width, height), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REPLICATE), matrix


# -- the mouth --------------------------------------------------------------------------------------------------------

def mouth_openings(envelope, face):
    """The mouth's opening in pixels for each frame: the loudness envelope (0..1) times the widest opening. Linear,
    so that the opening follows the voice exactly; the envelope is already smoothed per frame."""
    return np.clip(np.asarray(envelope, dtype=np.float64), 0.0, 1.0) * face.mouth()[2]


def draw_mouth(rgb, face, opening, matrix=None):
    """The mouth, `opening` pixels open, where `matrix` (the frame's head pose; None: none) moved it: a dark
    ellipse between two lips, a closed line when the opening is under a pixel."""
    import cv2

    (cx, cy), half_w, _ = face.mouth()
    angle = 0.0
    if matrix is not None:
        cx, cy = matrix @ np.array([cx, cy, 1.0])
        angle = math.degrees(math.atan2(matrix[1, 0], matrix[0, 0]))
    centre = (int(round(cx)), int(round(cy)))
    lip = max(1, half_w // 6)
    if opening < 1:
        cv2.ellipse(rgb, centre, (half_w, lip), angle, 0, 360, LIP_COLOUR, -1)
        return rgb
    half_h = int(round(opening / 2))
    cv2.ellipse(rgb, centre, (half_w + lip, half_h + lip), angle, 0, 360, LIP_COLOUR, -1)
    cv2.ellipse(rgb, centre, (half_w, half_h), angle, 0, 360, MOUTH_COLOUR, -1)
    return rgb


# -- video ------------------------------------------------------------------------------------------------------------

def ffmpeg_exe():
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def write_video(frames, path, size, fps, crf=INTERMEDIATE_CRF):
    """RGB `frames` (an iterable of HxWx3 uint8 arrays) as an H.264 .mp4 at `fps`, written to a temporary file and
    renamed into place; returns the number of frames written."""
    import imageio_ffmpeg

    count = 0
    with atomic_path(path) as tmp:
        writer = imageio_ffmpeg.write_frames(str(tmp), tuple(size), fps=fps, codec="libx264", pix_fmt_in="rgb24",
                                             pix_fmt_out="yuv420p", quality=None, macro_block_size=2,
                                             ffmpeg_log_level="error",
                                             output_params=["-crf", crf, "-preset", "veryfast"])
        writer.send(None)
        try:
            for frame in frames:
                writer.send(np.ascontiguousarray(frame, dtype=np.uint8))
                count += 1
        finally:
            writer.close()
    return count


def read_video(path):
    """(fps, (width, height), a generator of RGB frames) of a video file; one-line UserError when unreadable."""
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = reader.__next__()
    except (OSError, RuntimeError, StopIteration) as err:
        raise UserError(f"{path}: not a video that can be read ({first_line(err)})") from None
    width, height = meta["size"]

    def frames():
        for data in reader:
            yield np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)

    return float(meta["fps"]), (width, height), frames()


def video_frames_and_seconds(path):
    """(frames, seconds) of a video's first video stream, counted by decoding it."""
    import imageio_ffmpeg

    return imageio_ffmpeg.count_frames_and_secs(str(path))


def streams(path):
    """The kinds and codecs of a media file's streams, read from `ffmpeg -i` (no ffprobe is bundled):
    e.g. [("video", "h264"), ("audio", "aac")]."""
    result = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True)
    return [(kind.lower(), codec) for kind, codec in
            re.findall(r"Stream #\d+:\d+.*?: (Video|Audio): (\w+)", result.stderr)]


def mux(video, audio, path):
    """`video`'s picture with `audio` (a WAV) as AAC, into `path` (.mp4), through a temporary file: `path` is the
    whole video or absent. The picture is copied, not encoded again."""
    with atomic_path(path) as tmp:
        command = [ffmpeg_exe(), "-y", "-v", "error", "-i", str(video), "-i", str(audio), "-map", "0:v:0",
                   "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac", "-b:a", "128k", "-movflags", "+faststart",
                   str(tmp)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
            raise UserError(f"ffmpeg could not mux {video} with {audio}: {tail}")
    return Path(path)
