"""Params and metrics values: what round-trips through the repository, and what is refused."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keepsake.errors import CorruptObject, UnsupportedValue
from keepsake.objects.values import normalize, pack_values, unpack_values
from keepsake.tracking.project import Project
from keepsake.tracking.summary import summary_key
from tests.tracking.conftest import reader


def assert_same(got: Any, want: Any, where: str = "value") -> None:
    """Deep equality where NaN equals NaN, arrays compare by dtype, shape and content."""
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), where
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert np.array_equal(got, want, equal_nan=want.dtype.kind in "fc"), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), where
        for k in want:
            assert_same(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), where
    else:
        assert type(got) is type(want) and got == want, (where, got, want)


ARRAYS = {
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "f64_nan": np.array([1.5, np.nan, np.inf, -np.inf]),
    "f16": np.array([[0.5, -2.0]], dtype=np.float16),
    "i8": np.array([-128, 0, 127], dtype=np.int8),
    "u64": np.array([0, 2**64 - 1], dtype=np.uint64),
    "i32_3d": np.arange(24, dtype=np.int32).reshape(2, 3, 4),
    "bool": np.array([True, False, True]),
    "c64": np.array([1 + 2j, -3j], dtype=np.complex64),
    "empty": np.zeros((0, 3), dtype=np.float64),
    "big_endian": np.array([1.0, 2.0], dtype=">f4"),
    "fortran": np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
    "scalar_0d": np.array(3.25),
}

SCALARS: list[tuple[Any, Any]] = [
    (np.float32(0.5), 0.5),
    (np.float64(-1.25), -1.25),
    (np.float16(2.0), 2.0),
    (np.int8(-3), -3),
    (np.uint64(2**64 - 1), 2**64 - 1),
    (np.int64(-(2**63)), -(2**63)),
    (np.bool_(True), True),
    (np.str_("adam"), "adam"),
    (float("nan"), float("nan")),
    (float("inf"), float("inf")),
    (float("-inf"), float("-inf")),
    (np.float64("nan"), float("nan")),
    (None, None),
    ((1, "a", 2.5), [1, "a", 2.5]),
]


def _values() -> tuple[dict[str, Any], dict[str, Any]]:
    given: dict[str, Any] = {f"s{i}": v for i, (v, _) in enumerate(SCALARS)}
    want: dict[str, Any] = {f"s{i}": w for i, (_, w) in enumerate(SCALARS)}
    given["arrays"] = dict(ARRAYS)
    want["arrays"] = dict(ARRAYS)
    given["nested"] = {"opt": {"name": "adam", "betas": (np.float32(0.5), 0.999)}, "layers": [[1, 2], {"x": np.int16(3)}]}
    want["nested"] = {"opt": {"name": "adam", "betas": [0.5, 0.999]}, "layers": [[1, 2], {"x": 3}]}
    return given, want


def test_values_round_trip_through_params_and_metrics(project: Project) -> None:
    given, want = _values()
    e = project.start_experiment(path=None, params=given)
    e.checkpoint(metrics=given)
    e.stop()

    got = reader(project).get(e.id)
    assert_same(got.params, want, "params")
    assert_same(got.checkpoints[0].metrics, want, "metrics")
    assert_same(got.record.params, want, "record.params")
    assert_same(got.checkpoints[0].record.metrics, want, "record.metrics")
    [listed] = reader(project).list()
    assert_same(listed.params, want, "listed params")

    # rebuilt from the objects when the summary is gone: the same values
    project.repo.storage.delete(summary_key(e.id))
    rebuilt = reader(project).get(e.id)
    assert_same(rebuilt.params, want, "rebuilt params")
    assert_same(rebuilt.checkpoints[0].metrics, want, "rebuilt metrics")
    assert rebuilt.params["arrays"]["big_endian"].dtype.str == ">f4"


def test_primary_metric_may_be_a_numpy_scalar(project: Project) -> None:
    e = project.start_experiment(path=None)
    e.checkpoint(metrics={"loss": np.float32(0.5)}, primary_metric=("loss", "minimize"))
    e.checkpoint(metrics={"loss": np.float64(0.25)})
    e.checkpoint(metrics={"loss": np.float32("nan")})
    e.stop()
    got = reader(project).get(e.id)
    assert got.best() is not None and got.best().metrics["loss"] == 0.25  # type: ignore[union-attr]


def _some_function() -> None:
    return None


@pytest.mark.parametrize(
    ("params", "where", "type_name"),
    [
        ({"obj": object()}, "params['obj']", "object"),
        ({"opt": {"betas": {0.9, 0.99}}}, "params['opt']['betas']", "set"),
        ({"fn": _some_function}, "params['fn']", "function"),
        ({"opt": {1: "a"}}, "params['opt'][1]", "int"),
        ({"big": 2**70}, "params['big']", "int"),
        ({"neg": -(2**63) - 1}, "params['neg']", "int"),
        ({"layers": [1, {"act": max}]}, "params['layers'][1]['act']", "builtin_function_or_method"),
        ({"when": np.array(["2020-01-01"], dtype="datetime64[D]")}, "params['when']", "datetime64"),
        ({"names": np.array(["a", None], dtype=object)}, "params['names']", "object"),
        ({"b": b"bytes"}, "params['b']", "bytes"),
    ],
)
def test_unsupported_params_are_refused_naming_the_key_and_type(
    project: Project, params: dict[str, Any], where: str, type_name: str
) -> None:
    with pytest.raises(UnsupportedValue) as info:
        project.start_experiment(path=None, params=params)
    message = str(info.value)
    assert message.startswith(where + ":"), message
    assert type_name in message, message
    assert info.value.where == where


def test_unsupported_metrics_are_refused_and_nothing_is_recorded(project: Project) -> None:
    e = project.start_experiment(path=None)
    with pytest.raises(UnsupportedValue, match=r"^metrics\['extra'\]\['tags'\]: .*set"):
        e.checkpoint(metrics={"loss": 1.0, "extra": {"tags": {"a"}}})
    with pytest.raises(UnsupportedValue, match=r"^metrics\['loss'\]: .*complex"):
        e.checkpoint(metrics={"loss": 1 + 2j})
    e.stop()
    assert reader(project).get(e.id).checkpoints == []


def test_integer_limits() -> None:
    assert normalize(2**64 - 1, "x") == 2**64 - 1
    assert normalize(-(2**63), "x") == -(2**63)
    with pytest.raises(UnsupportedValue, match="64 bits"):
        normalize(2**64, "x")
    assert unpack_values(pack_values(normalize({"a": [2**64 - 1, -(2**63)]}, "p")), "id") == {"a": [2**64 - 1, -(2**63)]}


def test_normalize_is_idempotent_and_arrays_are_copied_on_read() -> None:
    given, want = _values()
    once = normalize(given, "params")
    assert_same(normalize(once, "params"), want)
    decoded = unpack_values(pack_values(once), "id")
    array = decoded["arrays"]["f32"]
    array[0, 0] = 99  # writable: a copy, not a view into the record bytes
    assert array.flags.writeable


def test_damaged_value_bytes_are_corrupt_objects() -> None:
    packed = pack_values({"a": np.arange(4)})
    with pytest.raises(CorruptObject):
        unpack_values(packed[:-3], "deadbeef")
    with pytest.raises(CorruptObject):
        unpack_values(b"\xc1", "deadbeef")  # never used in msgpack
    import msgpack

    unknown_ext = msgpack.packb(msgpack.ExtType(9, b"x"))
    with pytest.raises(CorruptObject):
        unpack_values(unknown_ext, "deadbeef")
    bad_shape = msgpack.packb(msgpack.ExtType(1, msgpack.packb(["<f8", [3], b"\0" * 8])))
    with pytest.raises(CorruptObject):
        unpack_values(bad_shape, "deadbeef")


_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.builds(np.float32, st.floats(width=32))
    | st.builds(lambda xs: np.array(xs, dtype=np.int32), st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4))
)
_documents = st.recursive(
    _leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=20
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(max_size=5), _documents, max_size=5))
def test_any_supported_document_round_trips(doc: dict[str, Any]) -> None:
    normalized = normalize(doc, "params")
    decoded = unpack_values(pack_values(normalized), "id")
    assert_same(decoded, _expected(normalized))
    assert pack_values(decoded) == pack_values(normalized)  # canonical: same bytes, same id


def _expected(value: Any) -> Any:
    """What a normalized value reads back as (tuples become lists)."""
    if isinstance(value, dict):
        return {k: _expected(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_expected(v) for v in value]
    return value


# -- torch --------------------------------------------------------------------------------


def test_torch_tensors_round_trip(project: Project) -> None:
    torch = pytest.importorskip("torch")
    weights = torch.arange(6, dtype=torch.float32).reshape(2, 3) / 3
    bf16 = torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)
    ints = torch.tensor([[1, 2], [3, 2**40]], dtype=torch.int64)
    grad = torch.ones(2, requires_grad=True) * 2
    params = {
        "w": weights,
        "bf16": bf16,
        "ints": ints,
        "grad": grad,
        "lr": torch.tensor(0.5),
        "steps": torch.tensor(7),
        "flag": torch.tensor(True),
        "bf16_scalar": torch.tensor(0.25, dtype=torch.bfloat16),
        "param": torch.nn.Parameter(torch.zeros(2)),
    }
    e = project.start_experiment(path=None, params=params)
    e.checkpoint(metrics={"loss": torch.tensor(0.125), "per_class": torch.tensor([0.5, 0.25])}, primary_metric=("loss", "minimize"))
    e.stop()

    got = reader(project).get(e.id).params
    assert_same(got["w"], weights.numpy())
    assert_same(got["bf16"], np.array([1.5, -2.0, 3.25], dtype=np.float32))
    assert_same(got["ints"], np.array([[1, 2], [3, 2**40]], dtype=np.int64))
    assert_same(got["grad"], np.array([2.0, 2.0], dtype=np.float32))
    assert_same(got["lr"], 0.5)
    assert_same(got["steps"], 7)
    assert_same(got["flag"], True)
    assert_same(got["bf16_scalar"], 0.25)
    assert_same(got["param"], np.zeros(2, dtype=np.float32))
    checkpoint = reader(project).get(e.id).best()
    assert checkpoint is not None
    assert_same(checkpoint.metrics["loss"], 0.125)
    assert_same(checkpoint.metrics["per_class"], np.array([0.5, 0.25], dtype=np.float32))


def test_torch_non_tensors_are_refused(project: Project) -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(UnsupportedValue, match=r"^params\['dtype'\]: .*dtype"):
        project.start_experiment(path=None, params={"dtype": torch.float32})
    with pytest.raises(UnsupportedValue, match=r"^params\['model'\]: .*Linear"):
        project.start_experiment(path=None, params={"model": torch.nn.Linear(2, 2)})


def test_torch_load_straight_from_a_checkpoint_stream(project: Project) -> None:
    torch = pytest.importorskip("torch")
    from pathlib import Path

    state = {"w": torch.randn(300, 200), "step": torch.tensor(5)}
    torch.save(state, Path(project.directory) / "model.pth")
    e = project.start_experiment(path=None)
    e.checkpoint(path="model.pth")
    e.stop()
    with reader(project).get(e.id).checkpoints[0].open("model.pth") as f:
        loaded = torch.load(f, weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and int(loaded["step"]) == 5
