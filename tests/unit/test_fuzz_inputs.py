"""Property-based tests of what users and files feed the program.

* The config loader (TOML documents, ``--set`` strings, every key with values of every TOML
  type): ``load_config`` returns a valid Config or raises ConfigError naming the key.
* The checkpoint reader, with structural damage (wrong attributes, missing / extra / reshaped
  groups and datasets, wrong dtypes, broken config JSON): ``validate`` raises CheckpointError,
  ``elfish-mpi validate FILE`` exits 2 with one ``elfish-mpi: error:`` line, and
  ``mpiexec -n 3 elfish-mpi train --resume FILE`` refuses without writing anything.

Bugs that these properties found (huge integers, deep nesting, resume state that does not fit) are fixed and pinned by tests; the properties
keep to inputs around them (noted where so).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from elfish_mpi import checkpoint as ck
from elfish_mpi.checkpoint import Checkpoint, CheckpointError
from elfish_mpi.cli import main as cli_main
from elfish_mpi.config import SECTIONS, Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "data" / "fashion-mnist"
TIMEOUT = 180
I64 = (-(2**63), 2**63 - 1)  # TOML integers are 64-bit

# --------------------------------------------------------------------------- TOML rendering


def toml_str(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_key(key: str) -> str:
    if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key):
        return key
    return toml_str(key)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return toml_str(v)
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def toml_document(doc: dict) -> str:
    lines = []
    for name, body in doc.items():
        if isinstance(body, dict):
            lines.append(f"[{toml_key(name)}]")
            lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in body.items()]
        else:
            lines.insert(0, f"{toml_key(name)} = {toml_value(body)}")  # root keys before any table
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- value strategies

KEYS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}
ALL_KEYS = [(s, k) for s, keys in KEYS.items() for k in keys]

names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12)
scalars = st.one_of(
    st.integers(*I64),
    st.sampled_from([0, 1, -1, 2, 3, 5, 100, 2**31, 2**63 - 1, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, -0.5, 1e-9, 1e7, 1e300]),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(["", " ", "iid", "lenet", "elfish", "fedavg", "none", "sleep", "paper", "npz", "random",
                     "gather", "fashion-mnist", "runs/x", "/nonexistent/path"]),
    st.datetimes(), st.dates(), st.times(),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(names, inner, max_size=3)), max_leaves=8)


def section_bodies():
    def body(section):
        keys = st.one_of(st.sampled_from(KEYS.get(section, ["x"])), names)
        return st.dictionaries(keys, values, max_size=4)
    return body


documents = st.dictionaries(
    st.one_of(st.sampled_from(list(SECTIONS)), names),
    st.one_of(st.sampled_from(list(SECTIONS)).flatmap(section_bodies()), values),
    max_size=5,
)


def load_from_text(text: str, overrides=()) -> Config:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cfg.toml"
        path.write_text(text, encoding="utf-8")
        return load_config(path, list(overrides))


def assert_names_the_problem(exc: ConfigError, text: str) -> None:
    """A config file is refused with a message that names the file (it is not TOML) or a
    section of it (what it holds is wrong)."""
    msg = str(exc)
    try:
        doc = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError):
        assert "cfg.toml" in msg, msg
        return
    assert any(name in msg for name in doc), (msg, list(doc))


def assert_valid(cfg: Config) -> None:
    assert isinstance(cfg, Config)
    again = Config.from_dict(json.loads(cfg.to_json()))  # what a checkpoint stores comes back
    assert again.to_dict() == cfg.to_dict()


# --------------------------------------------------------------------------- config properties


@settings(max_examples=150, deadline=None)
@given(doc=documents)
def test_random_toml_document_loads_or_raises_config_error(doc):
    text = toml_document(doc)
    try:
        cfg = load_from_text(text)
    except ConfigError as exc:
        assert_names_the_problem(exc, text)
        return
    assert_valid(cfg)


@settings(max_examples=100, deadline=None)
@given(raw=st.one_of(st.text(max_size=80), st.binary(max_size=80).map(lambda b: b.decode("latin-1"))))
def test_random_text_as_config_file_loads_or_raises_config_error(raw):
    try:
        cfg = load_from_text(raw)
    except ConfigError as exc:
        assert_names_the_problem(exc, raw)
        return
    assert_valid(cfg)


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(ALL_KEYS), value=values, via=st.sampled_from(["file", "set"]))
@example(key=("run", "rounds"), value=0, via="set")
@example(key=("workers", "capacity"), value=[1.0, "x"], via="file")
@example(key=("train", "lr"), value=float("nan"), via="set")
@example(key=("strategy", "replan"), value=1, via="file")
@example(key=("run", "out"), value=dt.date(2020, 1, 1), via="set")
def test_every_key_with_any_value_is_accepted_or_named_in_the_error(key, value, via):
    section, name = key
    literal = toml_value(value)
    try:
        if via == "file":
            cfg = load_from_text(f"[{section}]\n{name} = {literal}\n")
        else:
            cfg = load_config(None, [f"{section}.{name}={literal}"])
    except ConfigError as exc:
        assert f"{section}.{name}" in str(exc), (key, value, str(exc))
        return
    assert_valid(cfg)
    assert getattr(getattr(cfg, section), name) == getattr(getattr(Config.from_dict({section: {name: value}}), section), name)


set_text = st.one_of(
    st.text(st.sampled_from(list("run.rounds=data.path[]{}\"'=,.0123456789 -+eE_xtrufalsni\\\n\t#")), max_size=40),
    st.builds(lambda s, k, v: f"{s}.{k}={v}", st.sampled_from(list(SECTIONS) + ["", "nope", "run.x"]),
              st.sampled_from(sum(KEYS.values(), []) + ["", "zzz", "a.b"]),
              st.text(max_size=20)),
)


@settings(max_examples=200, deadline=None)
@given(overrides=st.lists(set_text, min_size=1, max_size=3))
def test_random_set_strings_load_or_raise_config_error(overrides):
    try:
        cfg = load_config(None, overrides)
    except ConfigError as exc:
        # the message quotes the --set it refuses, or names the key it sets
        msg = str(exc)
        heads = [text.split("=", 1)[0].strip() for text in overrides]
        assert any(repr(text) in msg for text in overrides) or any(h and h in msg for h in heads), (msg, overrides)
        return
    assert_valid(cfg)


@settings(max_examples=60, deadline=None)
@given(doc=documents, overrides=st.lists(set_text, max_size=2))
def test_set_on_top_of_a_random_document(doc, overrides):
    try:
        cfg = load_from_text(toml_document(doc), overrides)
    except ConfigError:
        return
    assert_valid(cfg)


# --------------------------------------------------------------------------- config bugs found


HUGE = "1" + "0" * 400  # an integer literal beyond the range of a float (and of TOML's 64 bits)
DEEP = "[" * 1500 + "]" * 1500


@pytest.mark.parametrize("override", [f"train.lr={HUGE}", f"workers.capacity=[{HUGE}]", f"strategy.keep_ratios=[{HUGE}]",
                                      f"run.round_timeout={HUGE}", f"data.alpha=-{HUGE}"],
                         ids=["train.lr", "workers.capacity", "strategy.keep_ratios", "run.round_timeout", "data.alpha"])
def test_huge_integer_for_a_number_key_is_a_config_error(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])


def test_huge_integer_in_a_config_file_is_a_config_error():
    with pytest.raises(ConfigError, match="train.lr"):
        load_from_text(f"[train]\nlr = {HUGE}\n")


@pytest.mark.parametrize("via", ["set", "file"])
def test_deeply_nested_value_is_a_config_error(via):
    with pytest.raises(ConfigError):
        if via == "set":
            load_config(None, [f"run.rounds={DEEP}"])
        else:
            load_from_text(f"[run]\nrounds = {DEEP}\n")


def test_cli_config_with_huge_integer_fails_cleanly():
    res = subprocess.run([sys.executable, "-m", "elfish_mpi", "config", "--set", f"train.lr={HUGE}"],
                         capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("elfish-mpi: error:") and "train.lr" in res.stderr


# --------------------------------------------------------------------------- checkpoint: structural mutations

ROUNDS, WORKERS = 3, 2
REQUIRED = ("model", "metrics", "workers")
OPTIONAL = ("masks", "coverage", "profiles", "state")


def base_ckpt() -> Checkpoint:
    rng = np.random.default_rng(0)
    return Checkpoint(
        round=ROUNDS,
        config={"run": {"rounds": 10}, "model": {"name": "lenet"}},
        strategy="elfish",
        model={"conv1.weight": rng.standard_normal((6, 1, 5, 5)).astype(np.float32),
               "conv1.bias": rng.standard_normal(6).astype(np.float32),
               "fc.weight": rng.standard_normal((10, 16)).astype(np.float32)},
        metrics={"round": np.arange(1, ROUNDS + 1), "round_time": rng.random(ROUNDS), "test_accuracy": rng.random(ROUNDS)},
        workers={"keep_ratio": rng.random((ROUNDS, WORKERS)), "busy_time": rng.random((ROUNDS, WORKERS))},
        masks={r: [{"conv1": np.arange(3 + w)} for w in range(WORKERS)] for r in range(1, ROUNDS + 1)},
        coverage={"conv1": np.arange(6)},
        profiles={"step_time": rng.random((WORKERS, 4))},
        state={"cursor": np.array([5, 7])},
        attrs={"num_workers": WORKERS, "model": "lenet"},
    )


MODEL_SHAPES = {k: v.shape for k, v in base_ckpt().model.items()}


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "ckpt.h5"
    ck.write(path, base_ckpt())
    return path


def fixed(text: str):
    raw = text.encode("utf-8")
    return np.array(raw, dtype=h5py.string_dtype("utf-8", max(len(raw), 1)))


def replace(f: h5py.File, name: str, value) -> None:
    if name in f:
        del f[name]
    f[name] = value


attr_values = st.one_of(
    st.integers(*I64).map(np.int64), st.floats().map(np.float64), st.text(max_size=20).map(fixed),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20),  # h5py stores no NUL in variable-length strings
    st.binary(max_size=12).map(np.bytes_),
    st.lists(st.integers(-3, 3), min_size=2, max_size=3).map(lambda v: np.array(v, dtype=np.int64)),
    st.just(np.bool_(True)),
)
new_names = st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=10)


def mutation(data, f: h5py.File) -> tuple[str, str | None]:
    """Apply one structural change; returns (what, fragment of the expected error or None if still valid)."""
    kind = data.draw(st.sampled_from([
        "format", "format_version", "round", "drop_required", "drop_optional", "group_to_dataset", "extra_root_group",
        "extra_root_group_bad_dtype", "subgroup_in_array_group", "metric_rows", "extra_metric", "worker_rows",
        "worker_columns", "config_text", "config_not_object", "config_not_string", "config_bytes", "strategy", "string_dataset",
        "empty_dataspace", "huge_dataset", "mask_names", "mask_dtype", "dangling_link", "external_link",
        "reshape_model",
    ]), label="kind")
    if kind == "format":
        v = data.draw(attr_values, label="format")
        raw = v[()] if isinstance(v, np.ndarray) and v.ndim == 0 else v
        assume(not (isinstance(raw, (str, bytes)) and raw in ("elfish-mpi", b"elfish-mpi")))
        f.attrs["format"] = v
        return kind, "not an elfish-mpi checkpoint"
    if kind == "format_version":
        v = data.draw(st.one_of(
            st.integers(*I64).filter(lambda i: i not in (1, 2)).map(np.int64),
            st.sampled_from([np.int64(0), np.int64(-1), np.int64(3), np.int64(2**62), np.uint64(2**64 - 1),
                             np.float64(1.0), fixed("1"), np.bool_(True), np.array([1, 1])]),
            st.floats().map(np.float64)), label="format_version")
        f.attrs["format_version"] = v
        return kind, "format_version"
    if kind == "round":
        v = data.draw(st.one_of(st.integers(*I64).filter(lambda i: i != ROUNDS).map(np.int64),
                                st.sampled_from([np.float64(ROUNDS), fixed(str(ROUNDS)), np.int64(-1)])), label="round")
        f.attrs["round"] = v
        return kind, "round"
    if kind == "drop_required":
        g = data.draw(st.sampled_from(REQUIRED))
        del f[g]
        return f"no /{g}", f"missing required group '/{g}'"
    if kind == "drop_optional":
        g = data.draw(st.sampled_from(OPTIONAL))
        del f[g]
        return f"no /{g}", None
    if kind == "group_to_dataset":
        g = data.draw(st.sampled_from(REQUIRED + OPTIONAL))
        replace(f, g, np.zeros(ROUNDS))
        return f"/{g} a dataset", "is not a group"
    if kind == "extra_root_group":
        name = data.draw(new_names.filter(lambda n: n not in f), label="name")
        g = f.create_group(name)
        g[data.draw(new_names, label="ds")] = data.draw(st.lists(st.floats(), max_size=5)).__len__() * [1.5]
        return f"extra /{name}", None
    if kind == "extra_root_group_bad_dtype":
        name = data.draw(new_names.filter(lambda n: n not in f), label="name")
        f.create_group(name)["text"] = fixed("hello")
        return f"extra /{name} with a string", "unexpected dtype"
    if kind == "subgroup_in_array_group":
        g = data.draw(st.sampled_from(("model", "metrics", "workers", "coverage", "profiles", "state")))
        f[g].create_group(data.draw(new_names.filter(lambda n: n not in f[g]), label="name"))
        return f"group in /{g}", "is not a dataset"
    if kind == "metric_rows":
        name = data.draw(st.sampled_from(sorted(f["metrics"])))
        n = data.draw(st.integers(0, 50).filter(lambda n: n != ROUNDS), label="rows")
        f[f"metrics/{name}"].resize((n,))
        return f"metrics/{name} {n} rows", f"metrics/{name} has shape"
    if kind == "extra_metric":
        n = data.draw(st.integers(0, 6), label="rows")
        f["metrics"][data.draw(new_names.filter(lambda x: x not in f["metrics"]), label="name")] = np.zeros(n)
        return f"extra metric of {n} rows", None if n == ROUNDS else "has shape"
    if kind == "worker_rows":
        name = data.draw(st.sampled_from(sorted(f["workers"])))
        shape = data.draw(st.sampled_from([(ROUNDS,), (ROUNDS + 1, WORKERS), (0, WORKERS), (ROUNDS, WORKERS, 1)]))
        replace(f, f"workers/{name}", np.zeros(shape))
        return f"workers/{name} {shape}", f"workers/{name} has shape"
    if kind == "worker_columns":
        name = data.draw(st.sampled_from(sorted(f["workers"])))
        cols = data.draw(st.integers(0, 5).filter(lambda c: c != WORKERS), label="cols")
        replace(f, f"workers/{name}", np.zeros((ROUNDS, cols)))
        return f"workers/{name} with {cols} columns", "disagree on the number of workers"
    if kind == "config_text":
        text = data.draw(st.text(max_size=30), label="config")
        try:
            json.loads(text)
            assume(False)
        except ValueError:
            pass
        f.attrs["config"] = fixed(text)
        return "config not JSON", "'config' is not valid JSON"
    if kind == "config_not_object":
        value = data.draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5), st.none()))
        f.attrs["config"] = fixed(json.dumps(value))
        return "config JSON not an object", "not a JSON object"
    if kind == "config_bytes":
        f.attrs["config"] = np.bytes_(b'{"run": "\xff\xfe"}')
        return "config not UTF-8", "'config' is not a (UTF-8) string"
    if kind == "config_not_string":
        f.attrs["config"] = data.draw(st.sampled_from([np.int64(1), np.float64(2.5), np.array([1, 2])]))
        return "config not a string", "'config' is not a (UTF-8) string"
    if kind == "strategy":
        f.attrs["strategy"] = np.int64(data.draw(st.integers(*I64)))
        return "strategy an integer", "'strategy' is not a (UTF-8) string"
    if kind == "string_dataset":
        g = data.draw(st.sampled_from(("model", "metrics", "state", "profiles", "coverage")))
        f[g]["label"] = fixed(data.draw(st.text(max_size=10)))
        return f"string dataset in /{g}", "unexpected dtype"
    if kind == "empty_dataspace":
        g = data.draw(st.sampled_from(("model", "state", "profiles")))
        f[g]["nothing"] = h5py.Empty("f8")
        return f"null dataspace in /{g}", "no shape"
    if kind == "huge_dataset":
        g = data.draw(st.sampled_from(("model", "state", "coverage")))
        f[g].create_dataset("big", shape=(2**40,), dtype="f8", chunks=(1024,))
        return f"huge dataset in /{g}", "more than the file holds"
    if kind == "mask_names":
        which = data.draw(st.sampled_from(["missing", "order"]))
        if which == "missing":
            del f["masks/round"]
            return "no /masks/round", "has no 'round' dataset"
        replace(f, "masks/round", f["masks/round"][()][::-1].copy())
        return "rounds out of order", "must list increasing rounds"
    if kind == "mask_dtype":
        rows = f["masks/conv1"].shape
        bad = data.draw(st.sampled_from([np.zeros(rows, dtype=np.float32), np.zeros(rows[:2] + (9,), dtype=np.uint8),
                                         np.zeros(rows[:1], dtype=np.uint8)]))
        neurons = f["masks/conv1"].attrs["neurons"]
        replace(f, "masks/conv1", bad)
        f["masks/conv1"].attrs["neurons"] = neurons
        return "float or misshaped mask", "masks/conv1"
    if kind == "dangling_link":
        g = data.draw(st.sampled_from(REQUIRED))
        del f[g]
        f[g] = h5py.SoftLink("/nowhere")
        return f"/{g} a dangling link", f"'/{g}'"
    if kind == "external_link":
        g = data.draw(st.sampled_from(REQUIRED))
        del f[g]
        f[g] = h5py.ExternalLink("/nonexistent/other.h5", "/model")
        return f"/{g} an external link", f"/{g}"
    if kind == "reshape_model":
        key = data.draw(st.sampled_from(sorted(MODEL_SHAPES)))
        shape = tuple(data.draw(st.lists(st.integers(0, 7), min_size=0, max_size=4), label="shape"))
        assume(shape != MODEL_SHAPES[key])
        replace(f, f"model/{key}", np.ones(shape, dtype=np.float32))
        return f"model/{key} reshaped to {shape}", None
    raise AssertionError(kind)


def cli(*argv: str) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_structurally_damaged_checkpoint_is_refused_with_one_clear_line(base_file, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.h5"
        shutil.copyfile(base_file, path)
        with h5py.File(path, "r+") as f:
            what, expect = mutation(data, f)

        # Execute: the reader, then the CLI (in-process: same code path as `elfish-mpi validate`)
        try:
            got = ck.validate(path)
            error = None
        except CheckpointError as exc:
            got, error = None, str(exc)
        rc, out, err = cli("validate", str(path))

        # Assert
        if expect is None:
            assert error is None, f"{what}: {error}"
            assert rc == 0 and "valid elfish-mpi checkpoint, round 3" in out and err == "", (what, out, err)
            assert got.round == ROUNDS
        else:
            assert error is not None, f"{what}: accepted"
            assert str(path) in error and expect in error, f"{what}: {error}"
            assert rc == 2 and out == "", (what, rc, out)
            lines = err.splitlines()
            assert len(lines) == 1 and lines[0].startswith("elfish-mpi: error: ") and expect in lines[0], (what, err)
            assert "Traceback" not in err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(MODEL_SHAPES)), shape=st.lists(st.integers(0, 7), max_size=4).map(tuple),
       drop=st.booleans(), extra=st.booleans())
def test_model_that_does_not_fit_is_refused_by_expect_model(base_file, key, shape, drop, extra):
    assume(shape != MODEL_SHAPES[key] or drop or extra)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.h5"
        shutil.copyfile(base_file, path)
        with h5py.File(path, "r+") as f:
            if drop:
                del f[f"model/{key}"]
            else:
                replace(f, f"model/{key}", np.ones(shape, dtype=np.float32))
            if extra:
                f["model/fc2.weight"] = np.ones((2, 2), dtype=np.float32)
        assert ck.validate(path).round == ROUNDS  # fine as a file

        with pytest.raises(CheckpointError, match="model does not match") as err:
            ck.validate(path, expect_model=MODEL_SHAPES)

        msg = str(err.value)
        assert str(path) in msg
        if drop:
            assert f"missing model key {key!r}" in msg
        elif shape != MODEL_SHAPES[key]:
            assert f"model key {key!r} has shape {shape}, expected {MODEL_SHAPES[key]}" in msg
        if extra:
            assert "unexpected model key 'fc2.weight'" in msg


@pytest.mark.parametrize("change, message", [
    (lambda f: f.attrs.__setitem__("format", fixed("hdf5-thing")), "not an elfish-mpi checkpoint"),
    (lambda f: f.attrs.__setitem__("format_version", np.int64(-7)), "unsupported format_version"),
    (lambda f: f.__delitem__("workers"), "missing required group '/workers'"),
    (lambda f: f["metrics/round_time"].resize((1,)), "metrics/round_time has shape (1,)"),
])
def test_validate_command_exits_2_with_one_line(base_file, tmp_path, change, message):
    path = tmp_path / "ckpt.h5"
    shutil.copyfile(base_file, path)
    with h5py.File(path, "r+") as f:
        change(f)

    res = subprocess.run([sys.executable, "-m", "elfish_mpi", "validate", str(path)], capture_output=True, text=True,
                         timeout=TIMEOUT, cwd=ROOT)

    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith(f"elfish-mpi: error: {path}: ") and message in res.stderr


# --------------------------------------------------------------------------- resuming from a damaged checkpoint


def mpiexec() -> str:
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else (shutil.which("mpiexec") or "mpiexec")


def launch(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "OMPI_", "MPI_LOCALRANK"))}
    return subprocess.run([mpiexec(), "-n", "3", sys.executable, "-m", "elfish_mpi", "train", *args],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real checkpoint: 2 rounds of elfish (planned keep ratios), 2 workers."""
    out = tmp_path_factory.mktemp("trained") / "run"
    res = launch("--out", str(out), "--set", f"data.path={SAMPLE}", "--set", "data.test_samples=200",
                 "--set", "data.max_samples=300", "--set", "run.rounds=2", "--set", "train.local_steps=2",
                 "--set", "workers.throttle=none")
    assert res.returncode == 0, res.stderr
    return out / "checkpoint.h5"


def damaged_copy(src: Path, dst: Path, change) -> str:
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        change(f)
    return hashlib.sha256(dst.read_bytes()).hexdigest()


def set_config(f: h5py.File, section: str, key: str, value) -> None:
    cfg = json.loads(f.attrs["config"].decode())
    cfg[section][key] = value
    f.attrs["config"] = fixed(json.dumps(cfg))


def reshape(f: h5py.File, name: str, shape) -> None:
    replace(f, name, np.zeros(shape, dtype=f[name].dtype))


@pytest.mark.parametrize("change, message", [
    (lambda f: f.attrs.__setitem__("format_version", np.int64(7)), "unsupported format_version 7"),
    (lambda f: f.attrs.__setitem__("config", fixed('{"run": {"rounds": 2')), "attribute 'config' is not valid JSON"),
    (lambda f: f.attrs.__setitem__("num_workers", np.int64(3)), "written by a job with 3 workers; this job has 2"),
    (lambda f: set_config(f, "workers", "capacity", [1.0, 1.0, 1.0]), "workers.capacity has 3 value(s) but the job has 2"),
    (lambda f: reshape(f, "model/fc1.weight", (7, 3)), "the checkpoint's model does not fit lenet on fashion-mnist"),
    (lambda f: set_config(f, "model", "name", "alexnet"), "does not fit alexnet on fashion-mnist"),
], ids=["format_version", "config-json", "world-size", "config-world-size", "model-shape", "other-model"])
def test_resume_from_damaged_checkpoint_is_refused_and_writes_nothing(trained, tmp_path, change, message):
    # Prepare
    bad = tmp_path / "bad.h5"
    digest = damaged_copy(trained, bad, change)
    new = tmp_path / "new"

    # Execute
    res = launch("--resume", str(bad), "--out", str(new))

    # Assert: a clear one-line refusal, nothing written, the file untouched
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("elfish-mpi: error:")]
    assert len(errors) == 1 and message in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not new.exists() or not any(new.iterdir())
    assert hashlib.sha256(bad.read_bytes()).hexdigest() == digest


def prepare_resume(path: Path, new: Path) -> dict:
    """Rank 0's checks of `train --resume PATH --out NEW` on a 2-worker job, in-process."""
    from elfish_mpi.cli import build_parser, prepare

    return prepare(build_parser().parse_args(["train", "--resume", str(path), "--out", str(new)]), 2)


def test_resume_checks_accept_the_undamaged_checkpoint(trained, tmp_path):
    setup = prepare_resume(trained, tmp_path / "new")
    assert setup["resume"] and setup["speeds"] == [1.0, 1.0]  # (the run's two clients, one a worker)
    assert not (tmp_path / "new").exists()


def test_resume_refuses_workers_datasets_of_different_widths(trained, tmp_path):
    from elfish_mpi.cli import known_errors

    bad = tmp_path / "bad.h5"
    damaged_copy(trained, bad, lambda f: reshape(f, "workers/busy_time", (2, 3)))
    with pytest.raises(known_errors(), match="disagree on the number of workers"):
        prepare_resume(bad, tmp_path / "new")


# Damage that once passed the checks before the job starts (found by running such resumes for
# real: a ValueError; an IndexError on worker rank 2; an IndexError on rank 0; KeyError 'macs'
# on rank 0). Each is now refused by rank 0 with a message that says what does not fit.
@pytest.mark.parametrize("change, message", [
    pytest.param(lambda f: f.attrs.__setitem__("num_workers", fixed("two")), "attribute num_workers = .*two.* is not a number"),
    pytest.param(lambda f: reshape(f, "state/cursor", (1,)),
                 re.escape("/state/cursor must hold one data position per client (2)")),
    pytest.param(lambda f: reshape(f, "coverage/fc1", (3,)), re.escape("/coverage/fc1 must have shape (500,)")),
    pytest.param(lambda f: f.__delitem__("profiles"), re.escape("/profiles/macs must have shape (2, ")),
], ids=["num_workers-text", "cursor-length", "coverage-width", "no-profiles"])
def test_resume_refuses_state_that_does_not_fit_the_job(trained, tmp_path, change, message):
    from elfish_mpi.cli import UsageError

    bad = tmp_path / "bad.h5"
    damaged_copy(trained, bad, change)
    with pytest.raises(UsageError, match=message):
        prepare_resume(bad, tmp_path / "new")
