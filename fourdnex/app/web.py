"""app.py's web server: the page (a Gradio ``Blocks``) beside the Rerun web viewer's files and the jobs'
recordings, on one address.

Routes besides the page: ``/viewer/<file>``, the web viewer (:func:`fourdnex.app.viewer.web_viewer_files`), and
``/jobs/<job>/scene.rrd``, a job's recording while its folder is kept (unknown or expired jobs: 404).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from fourdnex.app.engine import RECORDING
from fourdnex.app.jobs import JobFolders
from fourdnex.app.uploads import MAX_UPLOAD_BYTES

#: Content types of the viewer's files (WebAssembly must be served as such to be compiled while it downloads).
MEDIA_TYPES = {".html": "text/html", ".js": "text/javascript", ".wasm": "application/wasm", ".ico": "image/x-icon",
               ".png": "image/png"}  # fmt: skip


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, port: int) -> str | None:
    """The line app.py prints first when it listens beyond this machine."""
    if is_loopback(host):
        return None
    return (
        f"app.py: listening on {host}:{port}, NOT only on this machine: anyone who can reach it can run jobs on "
        "its model and download their files (there is no login); without --host it listens on 127.0.0.1 only"
    )


def build_app(page, jobs: JobFolders, viewer_files: Path, ttl_s: float):
    """A FastAPI application serving ``page`` at ``/``, the viewer's files and the jobs' recordings."""
    import gradio as gr
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import FileResponse

    app = FastAPI()
    served = {path.name: path for path in viewer_files.iterdir() if path.suffix in MEDIA_TYPES}

    @app.get("/viewer/{name}")
    def viewer_file(name: str):
        if name not in served:
            raise HTTPException(404)
        path = served[name]
        cache = "no-cache" if path.suffix == ".html" else "public, max-age=86400"
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers={"Cache-Control": cache})

    @app.get("/jobs/{job}/" + RECORDING)
    def recording(job: str):
        folder = jobs.find(job)
        if folder is None or not (folder / RECORDING).is_file():
            raise HTTPException(404, "no such job (jobs are kept for a while only)")
        return FileResponse(folder / RECORDING, media_type="application/octet-stream")

    page.delete_cache = (min(300, int(ttl_s)), int(ttl_s))  # Gradio's copies of uploads and outputs: the same age
    return gr.mount_gradio_app(
        app, page, path="/", max_file_size=MAX_UPLOAD_BYTES, allowed_paths=[str(jobs.root)], footer_links=[]
    )
