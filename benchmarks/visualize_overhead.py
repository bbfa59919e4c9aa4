"""Does watching slow the decoder? Decoder-reported seconds for one run, alone and inside
`nbdiff visualize` (speed max, headless Pilot), alternating, same loaded model.

    python benchmarks/visualize_overhead.py                 # tiny random llama, built here
    python benchmarks/visualize_overhead.py MODEL_DIR -b 4  # any converted folder

Feeds docs/benchmarks/visualize.md, section "`nbdiff visualize` / Measured".
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile


def tiny_folder(path: str) -> str:
    from nbdiff.method.settings import BlockDiffusionSettings, attach_settings
    from nbdiff.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer(mask_token=True)
    model = tiny_model("llama", vocab_size=len(tok))
    model.config.eos_token_id = tok.eos_token_id
    attach_settings(model.config, BlockDiffusionSettings(
        block_size=8, mask_token_id=tok.mask_token_id, mask_token="<|mask|>", adapted_block_size=8, source="tiny"))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="converted folder (default: a tiny random model)")
    parser.add_argument("-b", "--block-size", type=int, default=8)
    parser.add_argument("-n", "--max-new-tokens", type=int, default=256)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", default="Hello there")
    args = parser.parse_args()

    import nbdiff
    from nbdiff.decode.options import DecodeOptions
    from nbdiff_cli.visualize.app import make_app
    from nbdiff_cli.visualize.backends import LiveBackend

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or tiny_folder(tmp)
        model, tok = nbdiff.load(path, device="cpu")
    opts = DecodeOptions(block_size=args.block_size, threshold=args.threshold,
                         max_new_tokens=args.max_new_tokens, seed=0)

    async def in_app():
        app = make_app(LiveBackend.from_loaded(model, tok, "bench"), prompt=args.prompt, options=opts, speed=0)
        async with app.run_test(size=(100, 30)) as pilot:
            while not (app.finished and app.view.done):
                await pilot.pause(0.01)
            return app.view.final

    nbdiff.generate(model, tok, args.prompt, opts)  # warm-up
    alone, inside = [], []
    for _ in range(args.repeats):
        _, final = nbdiff.generate(model, tok, args.prompt, opts)
        alone.append(final.seconds)
        inside.append(asyncio.run(in_app()).seconds)
    print(f"tokens {final.new_tokens}  forwards {final.forwards}  tokens/forward {final.tokens_per_forward:.2f}")
    print(f"alone   seconds {[round(x, 3) for x in alone]}  median {statistics.median(alone):.3f}")
    print(f"in app  seconds {[round(x, 3) for x in inside]}  median {statistics.median(inside):.3f}")


if __name__ == "__main__":
    main()
