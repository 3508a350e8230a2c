"""``accel-models generate`` and ``accel-models demo``."""

from __future__ import annotations

import pytest

from accel_models import SamplingParams
from accel_models.cli import main
from accel_models.runtime.llm import LLM


def test_generate_command_streams_the_same_text_as_the_api(llama_dir, capsys):
    rc = main(["generate", str(llama_dir), "--prompt", "Hello world", "--max-tokens", "10", "--temperature", "0",
               "--kv-cache-memory", str(1 << 20)])
    out, err = capsys.readouterr()
    assert rc == 0
    with LLM(llama_dir, kv_cache_memory=1 << 20) as llm:
        ref = llm.generate("Hello world", SamplingParams(temperature=0.0, max_tokens=10))[0].outputs[0]
    assert out == ref.text + "\n"
    assert "loaded" in err and "tok/s" in err


def test_generate_command_batch_and_bad_input(llama_dir, capsys):
    rc = main(["generate", str(llama_dir), "--prompt", "Hello", "--prompt", "The quick", "--max-tokens", "4",
               "--seed", "3", "--kv-cache-memory", str(1 << 20)])
    out, err = capsys.readouterr()
    assert rc == 0 and out.count("--- prompt") == 2
    assert main(["generate", str(llama_dir), "--prompt", "x", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["generate", str(llama_dir / "nope"), "--prompt", "x"]) == 2
    assert "error" in capsys.readouterr().err


def test_demo_command(capsys):
    rc = main(["demo", "--backend", "reference", "--max-tokens", "8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "tiny-llama" in out and "tiny-mixtral" in out and "tokens/s" in out and "demo OK" in out


def test_demo_agreement_on_another_backend(capsys):
    """The demo compares a non-reference backend's greedy tokens with the reference's."""
    from accel_models.backends import list_backends

    others = [b.name for b in list_backends() if b.usable and b.name != "reference"]
    if not others:
        pytest.skip("no usable non-reference backend installed")
    rc = main(["demo", "--backend", others[0], "--max-tokens", "8"])
    out = capsys.readouterr().out
    assert rc == 0 and "agreement with the reference backend: 3/3 prompts identical" in out
