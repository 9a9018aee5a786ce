"""The Rerun web viewer inside app.py's page: its files, served by the app itself, and one recording per job.

The viewer is the one rerun-sdk ships (the same version that writes the recordings, so it reads them): its files
(``index.html``, the JavaScript and the WebAssembly) are copied once from the SDK's own viewer server, started for a
moment on the loopback interface, into a cache folder; the app then serves them under ``/viewer/`` beside the page,
on the app's own address, so no second port is opened. A job's recording (:func:`write_recording`) is logged with
:func:`fourdnex.geometry.viewer.log_result`, as rerun_vis.py does, and opened by the viewer from the app's
``/jobs/<job>/scene.rrd`` (:data:`EMBED_PAGE` turns the relative address into the absolute one the viewer needs).
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import numpy as np

from fourdnex.errors import FourDNeXError
from fourdnex.files import atomic_path

#: The files of the SDK's web viewer (what its index.html loads; the rest of its links point outside).
VIEWER_FILES = ("index.html", "re_viewer.js", "re_viewer_bg.wasm", "favicon.ico", "apple-touch-icon.png", "sw.js")
#: ``embed.html?rrd=ADDRESS``: opens the viewer on the recording at ADDRESS, relative to the page (the viewer takes
#: absolute addresses only).
EMBED_PAGE = """<!doctype html>
<meta charset="utf-8">
<title>fourdnex viewer</title>
<script>
  const rrd = new URLSearchParams(location.search).get("rrd");
  location.replace("index.html?url=" + encodeURIComponent(new URL(rrd, location.href).href));
</script>
"""
#: Points per frame the recording keeps at most (every n-th pixel along rows and columns): 40,000 coloured points per
#: frame turn smoothly in a browser's software renderer, and keep every pixel of the demo model's 96 x 144 frames.
MAX_POINTS_PER_FRAME = 40_000


class ViewerError(FourDNeXError, RuntimeError):
    """The web viewer's files could not be had."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rerun_executable() -> Path:
    """The ``rerun`` program inside the installed rerun-sdk."""
    import rerun_cli

    path = Path(rerun_cli.__file__).parent / ("rerun.exe" if os.name == "nt" else "rerun")
    if not path.is_file():
        raise ViewerError(f"rerun-sdk's viewer program is missing ({path}): reinstall rerun-sdk")
    return path


def web_viewer_files(cache: str | Path, timeout_s: float = 60.0) -> Path:
    """A folder holding the web viewer's files for the installed rerun-sdk (and :data:`EMBED_PAGE`), copied into
    ``cache/rerun-web-viewer-<version>`` the first time."""
    import rerun

    folder = Path(cache) / f"rerun-web-viewer-{rerun.__version__}"
    if all((folder / name).is_file() for name in (*VIEWER_FILES, "embed.html")):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    # An address no viewer opens: with one, the program serves the viewer alone (no gRPC server).
    command = [str(rerun_executable()), "--serve-web", "--bind", "127.0.0.1", "--web-viewer-port", str(port)]
    command.append(f"http://127.0.0.1:{port}/none.rrd")
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        for name in VIEWER_FILES:
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{name}", timeout=timeout_s) as response:
                        (partial / name).write_bytes(response.read())
                    break
                except (urllib.error.URLError, ConnectionError) as err:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise ViewerError(f"rerun did not serve the web viewer's {name} ({err})") from err
                    time.sleep(0.2)
        (partial / "embed.html").write_text(EMBED_PAGE)
        if folder.exists():
            shutil.rmtree(folder)
        partial.rename(folder)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def recording_stride(height: int, width: int, most: int = MAX_POINTS_PER_FRAME) -> int:
    """Every how many pixels a point is kept so that a frame has at most ``most`` points."""
    return max(1, math.ceil(math.sqrt(height * width / most)))


def write_recording(path: Path, rgb: np.ndarray, xyz: np.ndarray, reg: dict[str, np.ndarray], name: str) -> Path:
    """Log one result ``rgb (F, H, W, 3)`` uint8, ``xyz`` and its registration ``reg`` into the recording ``path``:
    the dynamic point cloud, the cameras and their path (:func:`fourdnex.geometry.viewer.log_result`), with a layout
    for a small panel: the 3D view and the time line (to play the frames), the side panels folded away."""
    import rerun as rr
    import rerun.blueprint as rrb

    from fourdnex.geometry.viewer import log_result

    pose, depth = reg["cam2world"][0].astype(np.float64), float(np.median(reg["depth"][0]))
    centre, right, down, forward = pose[:3, 3], pose[:3, 0], pose[:3, 1], pose[:3, 2]
    target = centre + depth * forward  # the scene centre on the first camera's axis
    eye = rrb.EyeControls3D(  # behind the first camera, a little above and to its right: depth shows at once
        position=centre + depth * (-1.2 * forward - 0.5 * down + 0.5 * right),
        look_target=target,
        eye_up=-down,
    )
    blueprint = rrb.Blueprint(
        rrb.Spatial3DView(  # the depth image stays in the camera's frustum, not as a second (colour-mapped) cloud
            origin="world",
            name="registered point cloud and cameras",
            contents=["+ $origin/**", f"- $origin/{name}/camera/image/depth"],
            eye_controls=eye,
        ),
        rrb.BlueprintPanel(state="collapsed"),
        rrb.SelectionPanel(state="collapsed"),
        rrb.TimePanel(state="collapsed", timeline="frame", play_state="playing", loop_mode="all", fps=8),
    )
    rec = rr.RecordingStream("fourdnex", recording_id=name)
    with atomic_path(path) as tmp:
        rec.save(str(tmp), default_blueprint=blueprint)
        log_result(rec, name, rgb, xyz, reg, stride=recording_stride(*rgb.shape[1:3]))
        rec.flush()
        rec.disconnect()  # closes the file before it is renamed into place
    return path


def viewer_html(rrd_address: str | None, height_px: int = 520) -> str:
    """The page's viewer panel: the web viewer (served at ``viewer/`` beside the page) on the recording at
    ``rrd_address`` (relative to the page, e.g. ``jobs/<job>/scene.rrd``), or a placeholder."""
    if rrd_address is None:
        return (
            f'<div class="fourdnex-viewer-empty" style="height:{height_px}px;display:flex;align-items:center;'
            'justify-content:center;border:1px dashed #999;border-radius:8px;color:#777">'
            "the registered point cloud and its cameras appear here</div>"
        )
    rrd = quote(f"../{rrd_address}", safe="/.")  # relative to viewer/embed.html
    return (
        f'<iframe class="fourdnex-viewer" src="viewer/embed.html?rrd={rrd}" title="Rerun viewer" '
        f'style="width:100%;height:{height_px}px;border:0;border-radius:8px" allow="fullscreen"></iframe>'
    )
