"""keepax.import_orbax on checkpoints written by the real orbax-checkpoint, compared
bit-exactly with what Orbax itself restores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.training import train_state

import keepax
from keepax._src.tools.orbax_import import import_orbax, looks_like_orbax_dir
from keepax.errors import CheckpointExistsError, KeepaxError


def _same(a, b):
    """Same structure, and every leaf the same dtype, shape and bytes."""
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb, (ta, tb)
    for x, y in zip(la, lb):
        if isinstance(x, np.ndarray | jax.Array):
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.shape == y.shape
            assert x.tobytes() == y.tobytes()
        else:
            assert type(x) is type(y) and x == y


@pytest.fixture(autouse=True)
def _orbax_warnings():
    """Orbax's own restores warn about how it finds shardings: not what is tested here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sharding info not provided",
                                category=UserWarning)
        yield


def _np(tree):
    """Orbax's restored arrays as NumPy (Python scalars stay)."""
    return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array | np.ndarray) else x,
                        tree)


class _Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


def _train_state():
    model = _Model()
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))
    state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                          tx=optax.adam(1e-3))
    grads = jax.tree.map(jnp.ones_like, state.params)
    return state.apply_gradients(grads=grads)


def test_standard_checkpointer_train_state(tmp_path):
    src = str(tmp_path / "orbax")
    with ocp.StandardCheckpointer() as ck:
        ck.save(src, _train_state())
    expected = ocp.StandardCheckpointer().restore(src)
    dst = str(tmp_path / "keepax")
    result = import_orbax(src, dst)
    assert result.kind == "checkpoint" and result.paths == (dst,)
    _same(keepax.restore(dst), _np(expected))


@pytest.mark.parametrize("ocdbt,compression", [(True, True), (False, False)])
def test_dtypes(tmp_path, ocdbt, compression):
    tree = {
        "bf16": jnp.arange(12, dtype=jnp.bfloat16).reshape(3, 4) / 7,
        "i4": jnp.array([1, -2, 7, -8], dtype=jnp.int4),
        "f8": jnp.array([1.5, -2.0, 0.25], dtype=jnp.float8_e4m3fn),
        "key": jax.random.key_data(jax.random.key(5)),
        "np": np.linspace(0, 1, 10),
        "step": 12,
        "lr": 0.5,
    }
    src = str(tmp_path / "orbax")
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt, use_compression=compression)
    with ocp.Checkpointer(handler) as ck:
        ck.save(src, args=ocp.args.PyTreeSave(tree))
    expected = ocp.PyTreeCheckpointer().restore(src)
    dst = str(tmp_path / "k")
    import_orbax(src, dst)
    restored = keepax.restore(dst)
    _same(restored, _np(expected))
    assert restored["i4"].dtype == ml_dtypes.int4
    assert restored["f8"].dtype == ml_dtypes.float8_e4m3fn
    assert restored["step"] == 12 and type(restored["step"]) is int


def _orbax_run(directory, compression=True):
    options = ocp.CheckpointManagerOptions(max_to_keep=5, best_fn=lambda m: m["loss"],
                                           best_mode="min")
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.PyTreeSave,
                 ocp.PyTreeCheckpointHandler(use_compression=compression))
    registry.add("state", ocp.args.PyTreeRestore,
                 ocp.PyTreeCheckpointHandler(use_compression=compression))
    states = {}
    with ocp.CheckpointManager(directory, options=options, handler_registry=registry) as mngr:
        for step, loss in ((0, 3.0), (10, 1.0), (20, 2.0)):
            state = {"w": jnp.full((4, 4), step, jnp.float32), "b": jnp.arange(3) + step}
            states[step] = state
            mngr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                    extra=ocp.args.JsonSave({"epoch": step})),
                      metrics={"loss": loss, "acc": step / 20})
        mngr.wait_until_finished()
    return states


@pytest.mark.parametrize("compression", [True, False])
def test_manager_directory(tmp_path, compression):
    src = str(tmp_path / "orbax_run")
    _orbax_run(src, compression)
    assert looks_like_orbax_dir(src)
    with ocp.CheckpointManager(src, item_names=("state", "extra")) as mngr:
        args = ocp.args.Composite(state=ocp.args.PyTreeRestore(), extra=ocp.args.JsonRestore())
        expected = {s: mngr.restore(s, args=args) for s in mngr.all_steps()}
    dst = str(tmp_path / "keepax_run")
    result = import_orbax(src, dst, best=("loss", "min"))
    assert result.kind == "manager" and result.steps == (0, 10, 20) and result.best_step == 10
    assert not looks_like_orbax_dir(dst)
    with keepax.CheckpointManager(dst, read_only=True, best=("loss", "min")) as mngr:
        assert mngr.all_steps() == [0, 10, 20]
        assert mngr.metrics(20) == {"loss": 2.0, "acc": 1.0}
        assert mngr.best_step() == 10
        for step in (0, 10, 20):
            got = mngr.restore(step)
            _same(got["state"], _np(dict(expected[step]["state"])))
            assert got["extra"] == {"epoch": step}
            assert mngr.metadata(step).metadata["orbax"]["best"] == ["loss", "min"]
    # Running it again skips what is there (an interrupted import resumes).
    again = import_orbax(src, dst)
    assert again.skipped == (0, 10, 20) and again.steps == ()


def test_single_step_and_selected_steps(tmp_path):
    src = str(tmp_path / "orbax_run")
    states = _orbax_run(src)
    one = import_orbax(os.path.join(src, "10"), str(tmp_path / "one"))
    got = keepax.restore(one.paths[0])
    _same(got["state"], _np(states[10]))
    assert keepax.inspect(one.paths[0]).metadata["orbax"]["metrics"]["loss"] == 1.0
    some = import_orbax(src, str(tmp_path / "some"), steps=[20])
    assert some.steps == (20,)
    with pytest.raises(KeepaxError, match=r"step\(s\) \[5\]"):
        import_orbax(src, str(tmp_path / "none"), steps=[5])
    with pytest.raises(CheckpointExistsError):
        import_orbax(os.path.join(src, "10"), str(tmp_path / "one"))


def test_relative_source_path(tmp_path, monkeypatch):
    """Orbax reads no metadata through a relative path: the import must not come out empty."""
    with ocp.StandardCheckpointer() as ck:
        ck.save(str(tmp_path / "orbax"), {"w": np.arange(6.0).reshape(2, 3)})
    monkeypatch.chdir(tmp_path)
    result = import_orbax("orbax", "k")
    assert result.nbytes == 48
    np.testing.assert_array_equal(keepax.restore(str(tmp_path / "k"))["w"],
                                  np.arange(6.0).reshape(2, 3))


def test_not_orbax(tmp_path):
    keepax.save(str(tmp_path / "k"), {"a": np.ones(2)})
    assert not looks_like_orbax_dir(str(tmp_path))
    with pytest.raises(KeepaxError, match="not an Orbax checkpoint"):
        import_orbax(str(tmp_path), str(tmp_path / "out"))


def test_orbax_cannot_read_s3(tmp_path, s3, monkeypatch):
    """Orbax itself cannot restore a checkpoint from S3 (why import-orbax wants local disk):
    should a later Orbax read s3://, this fails and import-orbax can take URLs."""
    src = str(tmp_path / "orbax")
    with ocp.StandardCheckpointer() as ck:
        ck.save(src, {"a": np.arange(4.0)})
    client = s3.client()
    for base, _, names in os.walk(src):
        for name in names:
            full = os.path.join(base, name)
            client.upload_file(full, s3.bucket, "ck/" + os.path.relpath(full, src))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    with pytest.raises(ValueError, match="absolute|local file"):
        ocp.PyTreeCheckpointer().restore(f"{s3.url}/ck")


def test_remote_source_says_copy_locally(tmp_path, capsys):
    import argparse

    from keepax._src.tools.orbax_import import add_import_orbax_parser

    with pytest.raises(KeepaxError, match=r"cannot read s3://.*aws s3 cp --recursive"):
        import_orbax("s3://bucket/orbax/10", str(tmp_path / "k"))
    with pytest.raises(KeepaxError, match="local disk only"):
        import_orbax("gs://bucket/orbax", str(tmp_path / "k"))
    parser = argparse.ArgumentParser()
    add_import_orbax_parser(parser.add_subparsers())
    args = parser.parse_args(["import-orbax", "s3://bucket/run", str(tmp_path / "k")])
    assert args.run(args) == 2
    err = capsys.readouterr().err
    assert "copy the Orbax checkpoint to local disk first" in err and "s3://bucket/run" in err


def test_without_orbax_installed(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["orbax"] = None  # as if orbax-checkpoint were not installed
        from keepax._src.tools.orbax_import import import_orbax
        from keepax.errors import KeepaxError
        try:
            import_orbax({str(tmp_path)!r}, {str(tmp_path / "x")!r})
        except KeepaxError as e:
            print(e)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert "pip install keepax[orbax]" in run.stdout, run.stderr


def test_cli(tmp_path, capsys):
    import argparse

    from keepax._src.tools.orbax_import import add_import_orbax_parser

    src = str(tmp_path / "orbax_run")
    _orbax_run(src)
    parser = argparse.ArgumentParser()
    add_import_orbax_parser(parser.add_subparsers())
    args = parser.parse_args(["import-orbax", src, str(tmp_path / "k"), "--best", "loss:min",
                              "--json", "-q"])
    assert args.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == [0, 10, 20] and out["best_step"] == 10


_MEMORY_CHILD = textwrap.dedent("""
    import json, sys
    import psutil
    import orbax.checkpoint as ocp
    from keepax._src.format import datafiles
    from keepax._src.tools.orbax_import import import_orbax
    datafiles.CHUNK_BYTES = int(sys.argv[3])  # smaller: leaves cut into several chunks
    base = psutil.Process().memory_info().rss
    import_orbax(sys.argv[1], sys.argv[2])
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) * 1024
    print(json.dumps({"extra": peak - base}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [64 << 20, 4 << 20], ids=["whole-leaves", "4MiB-chunks"])
def test_memory_bounded(tmp_path, chunk):
    """Import holds 64 MiB + one leaf, for a state 4x that size.

    Measured in a fresh process: its peak resident memory (VmHWM) minus its resident memory
    after importing orbax and keepax, just before ``import_orbax``; so it counts what Orbax
    and tensorstore allocate on their first restore (thread pools, caches) in the 64 MiB.
    """
    leaf = 16 << 20
    src = str(tmp_path / "orbax")
    tree = {f"w{i:02d}": np.full(leaf // 4, i, np.float32) for i in range(20)}  # 320 MiB
    with ocp.StandardCheckpointer() as ck:
        ck.save(src, tree)
    del tree
    # A fixed mmap threshold makes glibc return freed leaves to the system at once, so the
    # peak shows what is held, not what the allocator keeps for reuse.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    run = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, src, str(tmp_path / "k"), str(chunk)],
        capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    extra = json.loads(run.stdout.strip().splitlines()[-1])["extra"]
    print("peak extra", extra >> 20, "MiB")
    assert extra < (64 << 20) + leaf, extra
    assert len(list(keepax.open(str(tmp_path / "k")).chunks())) == 20 * max(1, leaf // chunk)
    got = keepax.restore(str(tmp_path / "k"))
    for i in range(20):
        assert got[f"w{i:02d}"].shape == (leaf // 4,)
        assert np.all(got[f"w{i:02d}"] == i)



def _listing(root):
    return sorted(os.path.relpath(os.path.join(b, n), root)
                  for b, dirs, files in os.walk(root) for n in dirs + files)


@pytest.mark.parametrize("read_only", [False, True])
def test_a_manager_on_an_orbax_run_refuses_and_names_the_import(tmp_path, read_only):
    src = str(tmp_path / "orbax_run")
    _orbax_run(src)
    before = _listing(src)
    extra = {} if read_only else {"metadata": {"run": 1}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", keepax.KeepaxWarning)  # no per-step warnings
        with pytest.raises(KeepaxError, match="holds Orbax checkpoints and no keepax steps") as e:
            keepax.CheckpointManager(src, read_only=read_only, **extra)
    assert f"keepax import-orbax {src} NEW_DIR" in str(e.value) and e.value.path == src
    assert _listing(src) == before  # no lock file, no run metadata left behind


def test_a_manager_on_one_orbax_checkpoint_refuses_too(tmp_path):
    src = str(tmp_path / "orbax")
    with ocp.StandardCheckpointer() as ck:
        ck.save(src, {"w": jnp.ones(3)})
    with pytest.raises(KeepaxError, match="keepax import-orbax"):
        keepax.CheckpointManager(src)


def test_orbax_steps_beside_keepax_steps_are_only_skipped(tmp_path):
    orbax_dir = str(tmp_path / "orbax_run")
    _orbax_run(orbax_dir)
    run = str(tmp_path / "run")
    with keepax.CheckpointManager(run, async_save=False) as mngr:
        mngr.save(5, {"w": np.ones(2)})
    os.rename(os.path.join(orbax_dir, "10"), os.path.join(run, "10"))
    with pytest.warns(keepax.KeepaxWarning, match="10: not a step of this manager"):
        with keepax.CheckpointManager(run) as mngr:
            assert mngr.all_steps() == [5]
    assert os.path.isdir(os.path.join(run, "10"))


def test_an_empty_or_foreign_directory_is_no_orbax_run(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.warns(keepax.KeepaxWarning, match="notes: not a step"):
        with keepax.CheckpointManager(str(tmp_path)) as mngr:
            assert mngr.all_steps() == []
