"""View results and their registrations in Rerun: write a recording, or stream to a live viewer.

Reads every result ``NNNNN.npz`` / ``NNNNN.pkl`` of ``--pkl_dir`` and, when present beside it (or in ``--reg_dir``),
its registration ``NNNNN_reg.npz`` from pm_registration.py; each result goes under its own entity path
``world/NNNNN`` on the ``frame`` timeline (see fourdnex/geometry/viewer.py).

Example:
    python rerun_vis.py --pkl_dir results/ --rr_recording results/scene.rrd
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from tqdm import tqdm

from fourdnex.cli import run
from fourdnex.errors import UsageError
from fourdnex.geometry.results import ResultError, find_results, load_registration, load_result, registration_path


def main(args: argparse.Namespace) -> None:
    """Load everything first (so bad input writes nothing), then log it to the chosen sinks."""
    if not (args.rr_recording or args.spawn or args.serve):
        raise UsageError("nothing to do: give --rr_recording FILE.rrd, --spawn or --serve")
    if args.stride < 1:
        raise UsageError(f"--stride must be >= 1, got {args.stride}")
    files = find_results(args.pkl_dir)
    if args.rr_recording and not Path(args.rr_recording).parent.is_dir():
        raise UsageError(f"--rr_recording {args.rr_recording}: its folder does not exist")
    items = []
    for path in tqdm(files, desc="loading", disable=len(files) < 2):
        reg_path = registration_path(path, args.reg_dir)
        reg = load_registration(reg_path) if reg_path.exists() else None
        result = load_result(path)
        if reg is not None and (
            reg["depth"].shape[1:] != result.xyz.shape[1:3] or reg["frame_index"].max() >= len(result.xyz)
        ):
            raise ResultError(f"{reg_path}: does not match {path} {result.xyz.shape}")
        items.append((path, result, reg))

    import rerun as rr

    from fourdnex.files import atomic_path
    from fourdnex.geometry.viewer import log_result

    rec = rr.RecordingStream("fourdnex")
    with atomic_path(args.rr_recording) if args.rr_recording else contextlib.nullcontext() as tmp:
        sinks = [rr.FileSink(str(tmp))] if tmp else []
        if args.spawn:
            rr.spawn(connect=False)
            sinks.append(rr.GrpcSink())
        if args.serve:
            server = rr.GrpcServerSink(bind_ip=args.bind, port=args.grpc_port)
            sinks.append(server)
            rr.serve_web_viewer(web_port=args.web_port, open_browser=False, connect_to=server.uri)
            print(serve_message(args.bind, args.grpc_port, args.web_port, server.uri))
        rec.set_sinks(*sinks)
        for path, result, reg in tqdm(items, desc="logging"):
            log_result(rec, path.stem, result.rgb, result.xyz, reg, args.stride, args.show_xyz, args.max_residual)
        rec.flush()
        if not args.serve:
            rec.disconnect()  # closes the file before it is renamed into place
    if args.serve:
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


def serve_message(bind: str, grpc_port: int, web_port: int, uri: str) -> str:
    """What ``--serve`` prints: where to open the viewer here, and how to reach it from another machine."""
    lines = [f"serving the scene on {bind}:{grpc_port}; open http://localhost:{web_port}/?url={uri} (or: rerun {uri})"]
    if bind in ("127.0.0.1", "localhost", "::1"):
        lines.append(
            f"from another machine: ssh -L {web_port}:localhost:{web_port} -L {grpc_port}:localhost:{grpc_port} "
            "USER@THIS_HOST, then open the same address there (--bind 0.0.0.0 opens the port to the network instead)"
        )
    lines.append("Ctrl-C stops")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line (the reference's ``--pkl_dir`` and ``--rr_recording`` keep their meaning)."""
    p = argparse.ArgumentParser(prog="rerun_vis.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--pkl_dir", "--input", dest="pkl_dir", required=True, help="results folder, or one result file")
    p.add_argument("--rr_recording", default=None, help="write the recording to this .rrd file")
    p.add_argument("--spawn", action="store_true", help="stream to a native viewer started here")
    p.add_argument("--serve", action="store_true", help="serve a web viewer and keep streaming until Ctrl-C")
    p.add_argument("--grpc_port", type=int, default=9876, help="--serve: the port viewers connect to")
    p.add_argument(
        "--bind",
        default="127.0.0.1",
        help="--serve: the address the scene is served on (default 127.0.0.1: this machine only; 0.0.0.0: every "
        "network interface, so anyone who can reach the machine can read the scene)",
    )
    p.add_argument("--web_port", type=int, default=9090, help="--serve: the port of the web viewer")
    p.add_argument("--reg_dir", default=None, help="where NNNNN_reg.npz files are (default: beside the results)")
    p.add_argument("--stride", type=int, default=2, help="log every N-th pixel along rows and columns as a point")
    p.add_argument("--show_xyz", action="store_true", help="also log the unregistered pointmap")
    p.add_argument("--max_residual", type=float, default=None, help="hide registered points farther from the input")
    return p


if __name__ == "__main__":
    run(main, build_parser())
