"""`accel-models backends` / `ops`: readable tables, and bad selection env reported, not ignored."""

from accel_models.cli import main


def test_backends_and_ops_tables(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "usable" in out
    assert main(["ops", "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    assert "paged_attention *" in out and "bound for 'reference'" in out


def test_ops_reports_a_malformed_accel_ops(monkeypatch, capsys):
    monkeypatch.setenv("ACCEL_OPS", "garbage")
    assert main(["ops"]) == 2
    assert "ACCEL_OPS: 'garbage' is not of the form op=backend" in capsys.readouterr().err
    monkeypatch.setenv("ACCEL_OPS", "no_such_op=reference")
    assert main(["ops"]) == 2
    assert "unknown op 'no_such_op'" in capsys.readouterr().err


def test_generate_rejects_bad_sampling_flags_before_loading(capsys):
    # the checkpoint path does not exist: the flag error must come first, with no loading attempted
    assert main(["generate", "/nonexistent-checkpoint", "--prompt", "hi", "--max-tokens", "0"]) == 2
    captured = capsys.readouterr()
    assert "max_tokens must be at least 1" in captured.err
    assert "loading" not in captured.err + captured.out
