"""Redirected output gets a line every 10 %, never tqdm's carriage-return redraws."""

from __future__ import annotations

import io

from dphrl.progress import LineProgress, progress_bar


def test_a_file_gets_one_line_per_tenth_and_no_carriage_returns():
    out = io.StringIO()
    bar = progress_bar(total=50, desc="train grpo", unit="step", stream=out)
    assert isinstance(bar, LineProgress)
    for i in range(50):
        bar.set_postfix(reward=f"{i / 50:.2f}")  # as the trainer does: this step's numbers, then update
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 10
    assert (lines[0].startswith("train grpo:  10% 5/50 step")
            and lines[-1].startswith("train grpo: 100% 50/50 step"))
    assert "reward=0.98" in lines[-1]


def test_iteration_resume_offset_and_an_interrupted_bar():
    out = io.StringIO()
    assert list(progress_bar(range(3), desc="sft", stream=out)) == [0, 1, 2]
    assert out.getvalue().count("\n") == 3  # 3 steps: each crosses a tenth
    out = io.StringIO()
    bar = progress_bar(total=100, initial=40, desc="train", stream=out)
    bar.update(5)  # 45: no tenth crossed since 40
    assert out.getvalue() == ""
    bar.close()  # stopped early: says where
    assert out.getvalue().startswith("train:  45% 45/100")
    assert progress_bar(total=3, disable=True, stream=io.StringIO()).disable


def test_library_bars_are_off_in_a_redirected_log_and_kept_on_a_terminal(tmp_path, capsys):
    """transformers' "Loading weights" / "Writing model shards" bars: off when stderr is not a terminal."""
    from transformers.utils import logging as hf_logging

    from dphrl.data.tokenizer import build_char_tokenizer
    from dphrl.models import load_model
    from dphrl.progress import quiet_library_bars
    from dphrl.sft import save_model
    from dphrl.testing import tiny_causal_lm

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    try:
        hf_logging.enable_progress_bar()
        quiet_library_bars(Terminal())
        assert hf_logging.is_progress_bar_enabled()
        quiet_library_bars(io.StringIO())
        assert not hf_logging.is_progress_bar_enabled()
        hf_logging.enable_progress_bar()
        tok = build_char_tokenizer()
        save_model(tiny_causal_lm(tok, hidden=32, layers=2, heads=4), tok, tmp_path / "m")
        capsys.readouterr()
        load_model(tmp_path / "m")  # stderr captured by pytest: not a terminal
        save_model(load_model(tmp_path / "m"), tok, tmp_path / "m2")
        err = capsys.readouterr().err
        assert "Loading weights" not in err and "Writing model shards" not in err
    finally:
        hf_logging.enable_progress_bar()
