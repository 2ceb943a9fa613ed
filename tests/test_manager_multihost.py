"""The manager's commit callbacks, run metadata and ``dtype=`` in a real multi-process run
(two ``jax.distributed`` processes on loopback, as tests/test_multihost.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from multiproc import SCRIPTS_DIR, run_processes

import keepax

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


MANAGER = SCRIPTS_DIR / "manager_run.py"


class _Iterator:
    def __init__(self) -> None:
        self.state = None

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        self.state = state


def test_iterator_states_of_two_processes_restore_on_one_by_choice(tmp_path: Path) -> None:
    # Two processes save steps whose iterator states are per process (position 1000*i + step).
    run_processes(MANAGER, 2, tmp_path=tmp_path, args=["async_failure", str(tmp_path / "run")],
                  timeout=120)
    with keepax.CheckpointManager(str(tmp_path / "run"), read_only=True) as mngr:
        assert mngr.all_steps() == [4]
        with pytest.raises(keepax.KeepaxError, match="saved per process by 2 processes and "
                                                     "this run has 1: pass per_process=k") as e:
            mngr.restore(like={"it": _Iterator()}, items=["it"])
        assert e.value.step == 4 and e.value.leaf == "['it']"
        it = _Iterator()
        assert mngr.restore(like={"it": it}, items=["it"], per_process=1)["it"] is it
        assert it.state == {"position": 1004, "shard": "shard-1"}
        every = mngr.restore(items=["it"], per_process="all")["it"]
        assert every == [{"position": 4, "shard": "shard-0"},
                         {"position": 1004, "shard": "shard-1"}]
        with pytest.raises(keepax.KeepaxError, match="per_process='all'") as e:
            mngr.restore(like={"it": _Iterator()}, items=["it"], per_process="all")
        assert e.value.step == 4


def test_incremental_is_refused_by_a_host_local_multi_process_manager(tmp_path: Path) -> None:
    results = run_processes(MANAGER, 2, tmp_path=tmp_path,
                            args=["incremental_refused", str(tmp_path / "run")], timeout=120)
    for r in results:
        assert "incremental=True does not work with host_local=True" in r.result["error"]
    assert not list((tmp_path / "run").glob("*/.keepax-store"))
