"""What app.py accepts from a browser: images and videos checked before they are decoded, and captions.

An image is checked in three steps, each before the next costs anything: the file's size on disk
(:data:`MAX_UPLOAD_BYTES`), then its header (PIL reads the format and the pixel size without decoding the pixels:
:data:`IMAGE_FORMATS`, at most :data:`MAX_PIXELS`; PIL itself refuses a header claiming over about 179 megapixels as
it opens the file), and only then the pixels. A video is checked the same way: its
size on disk, its container and first stream's frame size (PyAV reads them from the header), then the frames the job
needs. Every refusal is an :class:`UploadError` whose message says what was wrong, for the page to show.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import PIL.Image

from fourdnex.errors import UsageError

#: Largest upload accepted, in bytes: a 4K video frame as an uncompressed PNG is about 25 MB, and a phone's video of a
#: few seconds fits too; larger files cost seconds to move and check for nothing the model can use (it samples at
#: most 480 x 720 per frame).
MAX_UPLOAD_BYTES = 50 * 2**20
#: Most pixels of an image (or of one video frame) accepted: a 40-megapixel photo decodes to 120 MB of RGB; the
#: 50,000 x 50,000 header of a "decompression bomb" would claim 7.5 GB before a single row was checked.
MAX_PIXELS = 40_000_000
#: Image formats accepted (PIL's names): those browsers show, so the page can preview what the model will see.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
#: Video containers accepted (FFmpeg's names; it would also open text as a "video" of ANSI art, or an image).
VIDEO_FORMATS = ("mp4", "mov", "webm", "matroska", "avi")
#: Longest caption accepted, in characters (the text encoder reads 512 tokens; a caption of the training data's
#: style is 150-300 characters).
MAX_CAPTION_CHARS = 2000


class UploadError(UsageError):
    """An upload or caption the app refuses; the message is shown on the page."""


def _size_on_disk(path: str | Path | None, what: str) -> Path:
    """The path of an upload that exists and is not too large."""
    if path is None or str(path) == "":
        raise UploadError(f"no {what} given: upload one (or pick an example)")
    path = Path(path)
    if not path.is_file():
        raise UploadError(f"the {what} upload is gone (uploads are kept for a while only): upload it again")
    size = os.path.getsize(path)
    if size == 0:
        raise UploadError(f"the {what} file is empty")
    if size > MAX_UPLOAD_BYTES:
        raise UploadError(f"the {what} file is {size / 2**20:.0f} MB; at most {MAX_UPLOAD_BYTES // 2**20} MB")
    return path


def _check_pixels(width: int, height: int, what: str) -> None:
    if width * height > MAX_PIXELS:
        raise UploadError(
            f"the {what} is {width} x {height} pixels ({width * height / 1e6:.0f} megapixels); at most "
            f"{MAX_PIXELS / 1e6:.0f} megapixels: scale it down first"
        )


def check_image(path: str | Path | None, what: str = "image") -> PIL.Image.Image:
    """The upload at ``path`` as an RGB image, once its size on disk, format and pixel count (from the header) are
    accepted; else UploadError saying why."""
    path = _size_on_disk(path, what)
    try:
        with PIL.Image.open(path) as image:  # reads the header only
            if image.format not in IMAGE_FORMATS:
                raise UploadError(f"the {what} is a {image.format} file; accepted: {', '.join(IMAGE_FORMATS)}")
            _check_pixels(*image.size, what)
            image.seek(0)  # an animated GIF or WebP: its first frame
            return image.convert("RGB")
    except UploadError:
        raise
    except PIL.Image.DecompressionBombError as err:  # PIL's own limit, far above ours, refused at the header
        claimed = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(claimed[1]) / 1e6:.0f} megapixels" if claimed else "far too many pixels"
        raise UploadError(f"the {what} claims {size}; at most {MAX_PIXELS / 1e6:.0f} megapixels") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UploadError(
            f"the {what} file {Path(path).name!r} is not an image this app can read ({type(err).__name__}); "
            f"accepted: {', '.join(IMAGE_FORMATS)}"
        ) from None


def check_video(path: str | Path | None, num_frames: int, what: str = "video") -> list[PIL.Image.Image]:
    """The first ``num_frames`` frames of the upload at ``path`` as RGB images, once its size on disk and frame
    size (from the header) are accepted and it has that many frames; else UploadError saying why."""
    import av

    from fourdnex.files import read_video

    path = _size_on_disk(path, what)
    try:
        with av.open(str(path)) as container:
            if not set(container.format.name.split(",")) & set(VIDEO_FORMATS) or not container.streams.video:
                raise UploadError(
                    f"the {what} file {path.name!r} is not a video this app reads; accepted: {', '.join(VIDEO_FORMATS)}"
                )
            stream = container.streams.video[0]
            _check_pixels(stream.codec_context.width, stream.codec_context.height, f"{what}'s frame")
        frames = read_video(path, list(range(num_frames)))
    except UploadError:
        raise
    except (OSError, av.FFmpegError) as err:  # before ValueError: some of PyAV's errors are ValueErrors too
        raise UploadError(f"the {what} file {path.name!r} is not a video this app can read ({err})") from None
    except ValueError:  # it ends before frame num_frames - 1
        raise UploadError(f"the {what} has fewer than the {num_frames} frames the job samples") from None
    return [PIL.Image.fromarray(np.ascontiguousarray(frame)) for frame in frames]


def check_caption(text: str | None) -> str:
    """The caption, stripped; UploadError when it is empty or too long."""
    text = (text or "").strip()
    if not text:
        raise UploadError("the caption is empty: describe the scene and its motion in a sentence or two")
    if len(text) > MAX_CAPTION_CHARS:
        raise UploadError(f"the caption has {len(text)} characters; at most {MAX_CAPTION_CHARS}")
    return text
