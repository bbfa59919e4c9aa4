"""Package hygiene, settings and the CLI shell."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from nbdiff.errors import NBDiffError
from nbdiff.method.settings import BlockDiffusionSettings, attach_settings, read_settings
from nbdiff.testing import save_tiny_checkpoint
from nbdiff_cli.app import COMMANDS, app

runner = CliRunner()


def test_library_never_imports_cli_libraries():
    code = (
        "import importlib, pkgutil, sys, nbdiff\n"
        "for m in pkgutil.walk_packages(nbdiff.__path__, 'nbdiff.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in ('typer', 'rich', 'textual') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_is_light_and_lists_every_registered_command():
    code = (
        "import sys\n"
        "from nbdiff_cli.app import app\n"
        "heavy = [m for m in ('torch', 'transformers', 'textual') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output
    for name in COMMANDS:
        sub = runner.invoke(app, [name, "--help"])
        assert sub.exit_code == 0, (name, sub.output)


def test_the_draft_gate_flag_names_the_plans_default():
    """The help is light (no nbdiff.decode import), so it states DRAFT_GATE's value itself: kept equal here."""
    from nbdiff.decode.plan import DRAFT_GATE

    for name in ("generate", "chat", "visualize"):
        sub = runner.invoke(app, [name, "--help"], env={"COLUMNS": "300"})
        assert "--draft-gate" in sub.output and f"default {DRAFT_GATE}, the plan's DRAFT_GATE" in sub.output, name


def test_hand_written_defaults_in_help_survive_rich_markup():
    """Typer reads help as Rich markup, which swallows an unescaped "[default: ...]" that is not its own."""
    bench = runner.invoke(app, ["bench", "--help"], env={"COLUMNS": "300"}).output
    for text in ("[default: all]", "[default: --thresholds]", "[default: --draft-threshold's]"):
        assert text in bench, text
    assert "[default: loss.png next to the metrics]" in runner.invoke(app, ["plot", "--help"], env={"COLUMNS": "300"}).output


def test_settings_validation_names_the_field():
    with pytest.raises(NBDiffError, match="block_size"):
        BlockDiffusionSettings(block_size=3, mask_token_id=1)
    with pytest.raises(NBDiffError, match="context_mask"):
        BlockDiffusionSettings(mask_token_id=1, context_mask="full")
    with pytest.raises(NBDiffError, match="mask_token_id"):
        BlockDiffusionSettings()


def test_settings_round_trip_through_config_json(tmp_path):
    from transformers import AutoConfig

    save_tiny_checkpoint(tmp_path)
    assert read_settings(tmp_path) is None
    config = AutoConfig.from_pretrained(tmp_path)
    s = BlockDiffusionSettings(block_size=8, mask_token_id=7, source="here", extra={"steps": 3})
    attach_settings(config, s)
    config.save_pretrained(tmp_path)
    back = read_settings(tmp_path)
    assert back == s
    assert json.loads((tmp_path / "config.json").read_text())["nbdiff"]["block_size"] == 8


def test_info_plain_and_converted(tmp_path):
    from transformers import AutoConfig

    save_tiny_checkpoint(tmp_path)
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 0 and "not converted" in result.output
    config = AutoConfig.from_pretrained(tmp_path)
    attach_settings(config, BlockDiffusionSettings(block_size=16, mask_token_id=9))
    config.save_pretrained(tmp_path)
    result = runner.invoke(app, ["info", str(tmp_path), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output)["nbdiff"]["block_size"] == 16


def test_info_shows_the_block_size_converted_for_and_the_one_it_decodes_at(tmp_path):
    from transformers import AutoConfig

    save_tiny_checkpoint(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    for adapted, default in ((1, 1), (8, 8)):
        attach_settings(config, BlockDiffusionSettings(block_size=16, mask_token_id=9, adapted_block_size=adapted))
        config.save_pretrained(tmp_path)
        result = runner.invoke(app, ["info", str(tmp_path)], terminal_width=200)
        assert result.exit_code == 0, result.output
        assert "16 (converted for)" in result.output and f"{adapted} (the largest its weights" in result.output
        assert f"block size {default} by default" in result.output
        data = json.loads(runner.invoke(app, ["info", str(tmp_path), "--json"]).output)
        assert data["default_block_size"] == default and data["nbdiff"]["adapted_block_size"] == adapted


def test_info_reads_an_adapter_folder_through_its_base(tmp_path):
    """An --export adapter folder (the default model is one) has no config.json: info reads its base's."""
    from nbdiff.testing import save_tiny_converted

    base = save_tiny_converted(tmp_path / "base", "llama", block_size=8)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    settings = read_settings(base)
    record = dict(settings.to_dict(), adapted_block_size=4, base_model={"path": str(base), "source": "tiny"})
    (adapter / "nbdiff.json").write_text(json.dumps(record))
    result = runner.invoke(app, ["info", str(adapter)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "LlamaForCausalLM" in result.output and "block size 4 by default" in result.output
    assert "an adapter over" in result.output
    assert json.loads(runner.invoke(app, ["info", str(adapter), "--json"]).output)["default_block_size"] == 4


def test_a_converted_model_answers_as_its_ar_model_with_no_flag(tmp_path):
    """`nbdiff convert SRC --out D && nbdiff generate D --prompt ...`: the AR model's greedy reply, no flag."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = save_tiny_checkpoint(tmp_path / "src", "qwen2")
    result = runner.invoke(app, ["convert", str(src), "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert read_settings(tmp_path / "d").block_size == 32  # converted for 32, adapted to 1
    result = runner.invoke(app, ["generate", str(tmp_path / "d"), "--prompt", "Hello, how are you?", "-n", "16", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["block_size"] == 1 and not any("adapted" in n for n in data["notes"])
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": "Hello, how are you?"}], tokenize=False, add_generation_prompt=True)
    prompt = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    reply = out[0, prompt.shape[1]:].tolist()
    assert data["new_tokens"] == len(reply)  # the EOS, when it came, counted by both
    assert data["text"] == tok.decode(reply, skip_special_tokens=True)


def test_info_missing_folder_is_one_line_error(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "error:" in result.output and "Traceback" not in result.output


# ---- issue 9: what a user types or a model says is shown literally and safely -----------------


def test_version_works_without_a_command():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("nbdiff ")


def test_markup_in_paths_errors_and_hints_is_printed_literally(tmp_path, capsys):
    from nbdiff_cli.console import fail

    for path in ("foo[/]", "[bold red]x[/]"):
        result = runner.invoke(app, ["generate", path, "--prompt", "hi"])
        assert result.exit_code == 1, result.output
        assert f"model folder {path} does not exist" in result.output and "Traceback" not in result.output
    fail("needs bitsandbytes", "pip install 'nbdiff[quant]' (or bitsandbytes)")
    assert "pip install 'nbdiff[quant]'" in capsys.readouterr().err


def test_convert_summary_shows_bracketed_paths_literally(tmp_path):
    src = save_tiny_checkpoint(tmp_path / "src")
    out = tmp_path / "out[red]x[/]"
    result = runner.invoke(app, ["convert", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.output
    flat = "".join(result.output.split()).replace("│", "")  # the table may wrap a long path
    assert "out[red]x[/]" in flat and (out / "config.json").is_file()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_float_options_are_refused(tmp_path, value):
    for args in (["generate", str(tmp_path), "--prompt", "hi", "--temperature", value],
                 ["generate", str(tmp_path), "--prompt", "hi", "--top-p", value],
                 ["visualize", "--demo", "--speed", value]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert "must be a finite number" in result.output and "Traceback" not in result.output


def test_chat_set_refuses_non_finite_and_the_options_keep_it_out():
    from nbdiff.decode.options import DecodeOptions
    from nbdiff_cli.chat import parse_set

    for text in ("temperature nan", "temperature inf", "threshold nan", "top_p inf"):
        with pytest.raises(NBDiffError, match="finite"):
            parse_set(DecodeOptions(), text)
    for value in (float("nan"), float("inf")):
        with pytest.raises(NBDiffError, match="temperature"):
            DecodeOptions(temperature=value)


def test_control_characters_are_escaped_and_bad_utf8_replaced():
    from nbdiff_cli.console import printable, user_text

    assert printable("a\x1b[31mb\x02c\x7f\x9b\td\n") == "a\\x1b[31mb\\x02c\\x7f\\x9b\td\n"
    broken = b"caf\xe9 \xff ok".decode("utf-8", "surrogateescape")  # how Python hands over bad argv bytes
    assert user_text(broken) == "caf\ufffd \ufffd ok"
    broken.encode("utf-8", "surrogateescape")  # still surrogates before
    user_text(broken).encode("utf-8")  # valid afterwards


def test_replay_of_a_non_utf8_or_non_object_trace_is_one_line(tmp_path):
    from nbdiff_cli.visualize.trace import read_trace

    cases = {"latin.jsonl": b'{"kind": "header"}\n\xff\xfe not text\n', "list.jsonl": b"[1, 2, 3]\n",
             "number.jsonl": b'{"kind": "header"}\n42\n'}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(NBDiffError, match="not UTF-8|not a trace line"):
            read_trace(tmp_path / name)
        result = runner.invoke(app, ["visualize", "--replay", str(tmp_path / name)])
        assert result.exit_code == 1 and "error:" in result.output and "Traceback" not in result.output, result.output


def test_visualize_demo_starts_with_a_sample_prompt(monkeypatch):
    import nbdiff_cli.visualize.app as app_mod
    from nbdiff_cli.visualize import DEMO_PROMPT

    seen = {}

    class FakeApp:
        def run(self):
            pass

    def make_app(backend, *, prompt, **kwargs):
        seen["prompt"] = prompt
        return FakeApp()

    monkeypatch.setattr(app_mod, "make_app", make_app)
    assert runner.invoke(app, ["visualize", "--demo"]).exit_code == 0
    assert seen["prompt"] == DEMO_PROMPT
    assert runner.invoke(app, ["visualize", "--demo", "--prompt", "mine"]).exit_code == 0
    assert seen["prompt"] == "mine"


def test_plot_to_a_full_or_read_only_disk_is_one_line_and_leaves_no_temp(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"event": "train", "step": s, "loss": 1.0 / s, "block_size": 1,
                                           "lr": 1e-5, "mdm": 1.0, "ar": 1.0}) + "\n" for s in (1, 2, 3)))

    def full(self, fname, *args, **kwargs):
        with open(fname, "wb") as fh:
            fh.write(b"half a png")
        raise OSError(28, "No space left on device", str(fname))

    monkeypatch.setattr(Figure, "savefig", full)
    out = tmp_path / "plots" / "loss.png"
    result = runner.invoke(app, ["plot", str(metrics), "-o", str(out)])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "Traceback" not in result.output
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == []


def test_generate_on_truncated_weights_is_one_line(tmp_path):
    from nbdiff.testing import save_tiny_converted

    folder = save_tiny_converted(tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    result = runner.invoke(app, ["generate", str(folder), "--prompt", "hi", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "corrupt or truncated" in result.output and "Traceback" not in result.output


def test_generate_escapes_control_characters_and_decodes_bad_utf8(tmp_path, monkeypatch):
    from nbdiff.decode.events import BlockEvent, FinalEvent
    from nbdiff.testing import save_tiny_converted

    folder = save_tiny_converted(tmp_path / "m")
    prompts = []

    def fake_stream(model, tokenizer, prompt, *args, **kwargs):
        prompts.append(prompt)
        yield BlockEvent(seq=0, block=0, tokens=[1], text="x\x1b]0;owned\x07y\x02")
        yield FinalEvent(new_tokens=1, forwards=1, tokens_per_forward=1.0, seconds=0.1, tokens_per_second=10.0,
                         finish_reason="length", texts=["x\x1b]0;owned\x07y\x02"])

    monkeypatch.setattr("nbdiff.api.stream", fake_stream)
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")
    result = runner.invoke(app, ["generate", str(folder), "--prompt", bad, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert prompts == ["caf\ufffd"]
    assert "x\\x1b]0;owned\\x07y\\x02" in result.output and "\x1b" not in result.output
    result = runner.invoke(app, ["generate", str(folder), "--prompt", "hi", "--device", "cpu", "--json"])
    assert json.loads(result.output)["text"] == "x\x1b]0;owned\x07y\x02"  # --json stays exact


def test_chat_escapes_output_keeps_going_after_bad_utf8_and_echoes_set(tmp_path, monkeypatch):
    from nbdiff.decode.events import BlockEvent, FinalEvent
    from nbdiff.testing import save_tiny_converted

    folder = save_tiny_converted(tmp_path / "m")
    said = []

    def fake_stream(model, tokenizer, messages, *args, **kwargs):
        said.append(messages[-1]["content"])
        yield BlockEvent(seq=0, block=0, tokens=[1], text="hi\x1b[2J")
        yield FinalEvent(new_tokens=1, forwards=1, tokens_per_forward=1.0, seconds=0.1, tokens_per_second=10.0,
                         finish_reason="length", texts=["hi\x1b[2J"])

    monkeypatch.setattr("nbdiff.api.stream", fake_stream)
    script = b"caf\xe9\n/set threshold 0.8\nsecond\n"
    result = runner.invoke(app, ["chat", str(folder), "--device", "cpu"], input=script)
    assert result.exit_code == 0, result.output
    assert said == ["caf\ufffd", "second"]  # the conversation went on
    assert "set threshold = 0.8" in result.output
    assert "hi\\x1b[2J" in result.output and "\x1b" not in result.output


def test_int8_decoding_does_not_flood_the_screen_with_bitsandbytes_warnings(tmp_path, caplog):
    import logging

    import torch

    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:  # not importorskip: importing it warns
        pytest.skip("bitsandbytes is not installed")
    import nbdiff
    from nbdiff.testing import save_tiny_converted

    folder = save_tiny_converted(tmp_path / "m", hidden_size=128, intermediate_size=256)
    logging.getLogger("bitsandbytes").setLevel(logging.NOTSET)  # as in a fresh process
    with caplog.at_level(logging.WARNING):
        model, _ = nbdiff.load(folder, device="cpu", quantize="int8")
        with torch.no_grad():
            for _ in range(3):
                model(torch.tensor([[5, 17, 33]]))
    assert [r.getMessage() for r in caplog.records if r.name.startswith("bitsandbytes")] == []


def test_tui_text_and_tiles_escape_control_characters():
    from nbdiff_cli.visualize.state import RunView, Tile
    from nbdiff_cli.visualize.widgets import render_text, tile_label

    view = RunView(prompt="p\x1b[2J", blocks=["one\x1b]0;x\x07", "two\x02"])
    shown = render_text(view).plain
    assert "\x1b" not in shown and "\x07" not in shown and "\x02" not in shown
    assert "one\\x1b]0;x\\x07" in shown and "two\\x02" in shown and "p\\x1b[2J" in shown
    assert "\x1b" not in tile_label(Tile(token=5, text="\x1b", confidence=0.5, step=1, step_in_block=0))


@pytest.mark.anyio
async def test_tui_screenshot_says_where_it_wrote(tmp_path, monkeypatch):
    from nbdiff_cli.visualize.app import make_app
    from nbdiff_cli.visualize.backends import FakeBackend

    monkeypatch.chdir(tmp_path)
    app = make_app(FakeBackend(), prompt="x", speed=0)  # the default folder: the current one
    said = []
    monkeypatch.setattr(app, "notify", lambda message, **kwargs: said.append(message))
    async with app.run_test() as pilot:
        await pilot.press("s")
        await pilot.pause(0.1)
    svgs = list(tmp_path.glob("*.svg"))
    assert len(svgs) == 1 and said == [f"saved {svgs[0].resolve()}"]


def test_chat_ctrl_c_ends_the_line_and_shows_nothing_after_it(tmp_path, monkeypatch):
    import queue

    from nbdiff.decode.events import BlockEvent, FinalEvent
    from nbdiff.testing import save_tiny_converted
    from nbdiff_cli import chat as chat_mod

    folder = save_tiny_converted(tmp_path / "m")

    def fake_stream(model, tokenizer, messages, *args, cancel=None, **kwargs):
        yield BlockEvent(seq=0, block=0, tokens=[1], text="before")
        cancel.wait(10)  # the decoder notices the cancel only at its next forward
        yield BlockEvent(seq=1, block=1, tokens=[2], text="after")
        yield FinalEvent(new_tokens=2, forwards=2, tokens_per_forward=1.0, seconds=0.1, tokens_per_second=10.0,
                         finish_reason="cancelled", texts=["beforeafter"])

    class CtrlCAfterFirstBlock(queue.Queue):
        armed = False

        def get(self, *args, **kwargs):
            if CtrlCAfterFirstBlock.armed:
                CtrlCAfterFirstBlock.armed = False
                raise KeyboardInterrupt
            item = super().get(*args, **kwargs)
            if isinstance(item, BlockEvent) and item.text == "before":
                CtrlCAfterFirstBlock.armed = True
            return item

    monkeypatch.setattr("nbdiff.api.stream", fake_stream)
    monkeypatch.setattr(chat_mod.queue, "Queue", CtrlCAfterFirstBlock)
    result = runner.invoke(app, ["chat", str(folder), "--device", "cpu"], input="Hello\n")
    assert result.exit_code == 0, result.output
    assert "before\n" in result.output  # the ^C the terminal echoes ends this line, not the next one
    assert "after" not in result.output and "stopped" in result.output


def test_the_kernels_packages_offline_notice_is_quieted_with_bitsandbytes():
    """On AVX512-BF16 CPUs, importing bitsandbytes (peft does, for every adapter folder such as the default
    model) fetches a kernel through `kernels`, which warns in offline mode that it skips a publisher check."""
    import logging

    from nbdiff.fsutil import quiet_bitsandbytes

    quiet_bitsandbytes()
    for name in ("kernels._internals.hf_hub", "bitsandbytes.backends.cpu.ops"):
        assert not logging.getLogger(name).isEnabledFor(logging.WARNING)
        assert logging.getLogger(name).isEnabledFor(logging.ERROR)
