"""`nerd serve`: the web page of `nerd.serve` on this machine (localhost by default)."""

from __future__ import annotations

import argparse

EPILOG = """\
the page: drop a noisy image (gray or colour, 8/16-bit PNG/TIFF, JPEG, BMP), give sigma or let it be estimated,
set the solver's iterations, and see noisy and denoised side by side, x_hat after each solver iteration and the
residual curve; the result downloads at the input's bit depth (16-bit PNG for a 16-bit input).
The same checks as nerd denoise (--max-pixels from the header, bit depth, colour), and files over --max-upload-mb
are refused. Serves 127.0.0.1 only unless --host says otherwise: there is no login, anyone who can reach the
port can use the machine's CPU/GPU. Needs gradio: pip install 'nerd[serve]'.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from nerd.config import DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_MB
    from nerd.config import DEFAULT_SERVE_HOST as DEFAULT_HOST

    p = sub.add_parser(
        "serve", help="a local web page: drop an image, see it denoised and the equilibrium forming",
        description="Serve a web page that denoises one image at a time and shows the solver's iterations.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", metavar="N", help="port (default: the first free one from 7860)")
    p.add_argument("--max-upload-mb", metavar="MB", default=str(DEFAULT_MAX_UPLOAD_MB).removesuffix(".0"),
                   help=f"refuse uploads larger than this (default {DEFAULT_MAX_UPLOAD_MB:g} MB)")
    p.add_argument("--max-pixels", metavar="N", default=str(DEFAULT_MAX_PIXELS),
                   help=f"refuse images of more pixels, from the header (default {DEFAULT_MAX_PIXELS:,}; 0: no limit)")
    p.add_argument("--weights", metavar="NAME|PATH",
                   help="weights for every image (default: the shipped weights nearest each image's sigma)")
    p.add_argument("--device", metavar="cpu|cuda[:N]", help="default: cuda when available, else cpu")


def run(args: argparse.Namespace) -> int:
    import math
    import signal

    from nerd.cli import UserError, check_device
    from nerd.cli.denoise import _number
    from nerd.denoise import default_device
    from nerd.serve import Engine, launch, require_gradio

    port = _number(args.port, "--port", int, 0)
    if port is not None and port > 65535:
        raise UserError(f"--port must be 0..65535, got {args.port!r}")
    max_upload_mb = _number(args.max_upload_mb, "--max-upload-mb", float, 0)
    if not max_upload_mb > 0 or math.isinf(max_upload_mb):
        raise UserError(f"--max-upload-mb must be a number > 0, got {args.max_upload_mb!r}")
    max_pixels = _number(args.max_pixels, "--max-pixels", int, 0)
    device = check_device(args.device or default_device())
    require_gradio()  # before the weights: the missing package is the first thing to fix
    engine = Engine(args.weights, device=device, max_upload_mb=max_upload_mb, max_pixels=max_pixels)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"nerd serve: note: listening on {args.host}: anyone who can reach this port can use the page "
              "(there is no login)")
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop cleans up like Ctrl-C
    try:
        launch(engine, host=args.host, port=port or None)
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.close()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C: gradio closes its server, `run` removes the written results."""
    raise KeyboardInterrupt
