"""`--dtype auto` on CPUs: bf16 only where the CPU has it natively (detection mocked)."""

import pytest
import torch

from nbdiff import cpu_kernel, hardware
from nbdiff.errors import NBDiffError
from nbdiff.loading import choose_dtype, resolve_dtype


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a Linux x86 CPU with the given /proc/cpuinfo flags."""

    def set_flags(*flags, machine="x86_64", system="linux"):
        monkeypatch.setattr(hardware, "_cpuinfo_flags", lambda: set(flags))
        monkeypatch.setattr(hardware.platform, "machine", lambda: machine)
        monkeypatch.setattr(hardware.sys, "platform", system)
        hardware.cpu_bf16.cache_clear()
        cpu_kernel.cpu_isa.cache_clear()  # read from the same flags

    yield set_flags
    hardware.cpu_bf16.cache_clear()
    cpu_kernel.cpu_isa.cache_clear()


def test_cpu_without_native_bf16_keeps_fp32(cpu):
    cpu("sse4_2", "avx2", "avx512f", "avx512bw")  # AVX512 but no BF16 extension
    choice = choose_dtype("auto", "cpu")
    assert choice.dtype == torch.float32 and choice.name == "fp32"
    assert "no native bf16" in choice.reason
    assert resolve_dtype("auto", "cpu") == torch.float32


@pytest.mark.parametrize("flags,machine,words", [
    (("avx512f", "avx512_bf16"), "x86_64", "AVX512-BF16"),
    (("amx_tile", "amx_bf16"), "x86_64", "AMX-BF16"),
    (("fp", "asimd", "bf16"), "aarch64", "BF16 extension"),
])
def test_cpu_with_native_bf16_picks_bf16(cpu, flags, machine, words):
    cpu(*flags, machine=machine)
    choice = choose_dtype("auto", "cpu")
    assert choice.dtype == torch.bfloat16 and words in choice.reason


def test_arm_flag_bf16_means_nothing_on_x86_and_apple_uses_sysctl(cpu, monkeypatch):
    cpu("bf16", machine="x86_64")
    assert resolve_dtype("auto", "cpu") == torch.float32
    for answer, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        cpu(machine="arm64", system="darwin")
        monkeypatch.setattr(hardware, "_apple_feat_bf16", lambda: answer)
        assert resolve_dtype("auto", "cpu") == dtype


def test_explicit_dtype_wins_over_detection(cpu):
    cpu("avx512_bf16")
    assert resolve_dtype("fp32", "cpu") == torch.float32
    assert choose_dtype("fp32", "cpu").reason == "--dtype fp32"
    cpu()
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(NBDiffError, match="--dtype"):
        resolve_dtype("fp64", "cpu")


def test_load_model_records_the_choice(cpu, tmp_path):
    from nbdiff.loading import load_model, loaded_dtype
    from nbdiff.testing import save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path / "m")
    cpu("avx512_bf16")
    model, _ = load_model(folder, device="cpu")
    assert model.dtype == torch.bfloat16 and loaded_dtype(model).name == "bf16"
    cpu("avx2")
    model, _ = load_model(folder, device="cpu")
    assert model.dtype == torch.float32 and "no native bf16" in loaded_dtype(model).reason


def test_info_and_generate_json_say_which_dtype_and_why(cpu, tmp_path):
    import json

    from typer.testing import CliRunner

    from nbdiff.testing import save_tiny_converted
    from nbdiff_cli.app import app

    folder = save_tiny_converted(tmp_path / "m", "llama", block_size=4, mask="added")
    runner = CliRunner()
    cpu("avx2")
    out = runner.invoke(app, ["info", str(folder), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["auto_dtype"]["dtype"] == "fp32"
    out = runner.invoke(app, ["generate", str(folder), "-p", "Hello", "-n", "4", "--json", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.stdout.strip().splitlines()[-1])
    assert payload["dtype"] == "fp32" and "no native bf16" in payload["dtype_reason"]
    cpu("avx512_bf16")
    out = runner.invoke(app, ["generate", str(folder), "-p", "Hello", "-n", "4", "--json", "--device", "cpu"])
    payload = json.loads(out.stdout.strip().splitlines()[-1])
    assert payload["dtype"] == "bf16" and "AVX512-BF16" in payload["dtype_reason"]
