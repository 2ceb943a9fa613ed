"""The manager's commit callbacks, run metadata and ``dtype=`` in a real multi-process run
(two ``jax.distributed`` processes on loopback, as tests/test_multihost.py)."""

from __future__ import annotations

from pathlib import Path

from multiproc import SCRIPTS_DIR, run_processes

HABITS = SCRIPTS_DIR / "manager_habits_run.py"


def test_each_process_hears_of_each_step_and_reads_the_run_metadata(tmp_path: Path) -> None:
    results = run_processes(HABITS, 2, tmp_path=tmp_path, args=[str(tmp_path / "run")],
                            timeout=120)
    for index, r in enumerate(results):
        got = r.result
        assert got["run_metadata"] == {"run": "mp", "processes": 2}
        calls = got["calls"]
        assert [c["step"] for c in calls] == [1, 2, 3]
        assert all(c["process"] == index and c["writer"].startswith("keepax-writer")
                   for c in calls)
        assert calls[0]["error"] is None and calls[1]["error"] is None
        # Step 3 failed on process 1: every process hears of it, naming the step.
        assert "step 3" in calls[2]["error"] and "No space left" in calls[2]["error"]
        assert "step 3" in got["raised"]
        assert got["steps"] == [1, 2]
        assert got["dtypes"] == ["bfloat16", "int32"]
    assert (tmp_path / "run" / "keepax-run.json").is_file()
