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
    assert lines[0].startswith("train grpo:  10% 5/50 step") and lines[-1].startswith("train grpo: 100% 50/50 step")
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
