"""`nbdiff visualize`: watch tokens unmask inside each block, live (a Textual app).

Modules: `app` (the App and its factory `make_app(backend)`), `widgets` (drawing and the options
form), `state` (events folded into what is drawn), `backends` (live decoder, replay, fake), `trace`
(record/replay JSON lines). This module imports only typer at the top: textual, torch and the
decoder load inside the command, so `nbdiff --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from nbdiff_cli.options import Hardware, ModelArg, QuantizeChoice, decoding_options

TRACE = "Trace"
DEMO_PROMPT = "Explain block diffusion in one sentence."


@decoding_options(max_new_tokens=128)
def visualize(
    model: ModelArg = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Prompt to run at start (or type one in the app).")] = None,
    record: Annotated[Optional[Path], typer.Option("--record", help="Write the run's events to this file (JSON lines).",
                                                   rich_help_panel=TRACE)] = None,
    replay: Annotated[Optional[Path], typer.Option("--replay", help="Play a recorded trace, no model needed.",
                                                   rich_help_panel=TRACE)] = None,
    speed: Annotated[float, typer.Option("--speed", help="Animation speed in steps per second (0 = as fast as the model).",
                                         rich_help_panel=TRACE)] = 8.0,
    demo: Annotated[bool, typer.Option("--demo", help="Synthetic events, no model (to try the interface).",
                                       rich_help_panel=TRACE)] = False,
    *,
    options=None,
    hardware: Hardware = Hardware(),
    system: Optional[str] = None,
) -> None:
    """Watch the decoder unmask tokens block by block, live, in the terminal.

    Keys: / new prompt, p pause, n single step, + and - speed, c colour by confidence or by step, o block size, sub-blocks and threshold, r run again, s save an SVG screenshot, q quit.
    """
    from nbdiff.errors import NBDiffError

    if speed < 0:
        raise NBDiffError(f"--speed must be >= 0, got {speed}", "steps per second; 0 = as fast as the model")
    if record is not None and not record.parent.is_dir():
        raise NBDiffError(f"--record {record}: folder {record.parent} does not exist", "create it or pick another path")
    from nbdiff_cli.visualize.backends import FakeBackend, LiveBackend, ReplayBackend

    if replay is not None:
        if record is not None:
            raise NBDiffError("--record and --replay exclude each other", "a replay is already a trace; copy the file")
        backend = ReplayBackend(replay)
    elif demo:
        backend = FakeBackend(delay=0.05)
        prompt = prompt or DEMO_PROMPT  # the demo shows something from the first frame
    else:
        from nbdiff.adapters import is_adapter_folder
        from nbdiff.loading import check_folder

        from nbdiff_cli.models import resolve_model

        model = resolve_model(model)  # omitted: the default model (built on first use)
        if not is_adapter_folder(model):
            check_folder(model)  # a missing folder fails here, not after the screen has opened
        quantize = hardware.quantize
        backend = LiveBackend(model, quantize=None if quantize == QuantizeChoice.none else quantize.value,
                              device=hardware.device.value, dtype=hardware.dtype.value, system=system)

    from nbdiff_cli.visualize.app import make_app

    app = make_app(backend, prompt=prompt or "", options=options, speed=speed, record=record)
    app.run()
