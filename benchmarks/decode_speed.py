"""Retired: the decoding benchmark is now `nbdiff bench` (nbdiff/bench.py, nbdiff_cli/bench.py).

This file only forwards to it, so old notes keep a command that runs:

    python benchmarks/decode_speed.py MODEL [options]   is   nbdiff bench MODEL [options]

The old script decoded four prompts to a fixed length with EOS ignored; `nbdiff bench` honours EOS
(the replies users get), reports quality beside speed, and splits the figures per kind of text.
"""

import sys

from nbdiff_cli.app import app

if __name__ == "__main__":
    app(["bench", *sys.argv[1:]])
