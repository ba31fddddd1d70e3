import numpy as np
import pytest

from fedmm.core.aggregation import ComponentInputs, aggregate_component, stack_component
from fedmm.core.components import component_layouts
from fedmm.core.protocol import ClientUpdate
from strategies.component_fedavg import aggregate_updates

SHAPES = {
    "encoders.image.proj.weight": (5, 4),
    "encoders.image.proj.bias": (5,),
    "encoders.text.proj.weight": (3, 2),
    "fusion.norm.weight": (6,),
    "heads.vqa.weight": (2, 6),
    "heads.txt_color.weight": (4, 6),
}
PROFILES = [
    ["encoder.image", "fusion.shared", "head.vqa"],
    ["encoder.text", "fusion.shared", "head.txt_color"],
    ["encoder.image", "encoder.text", "fusion.shared", "head.vqa", "head.txt_color"],
]


def make_updates(n: int, seed: int = 0) -> list[ClientUpdate]:
    rng = np.random.default_rng(seed)
    updates = []
    for i in range(n):
        components = PROFILES[i % len(PROFILES)]
        arrays = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()
                  if any(k.startswith(p) for p in _prefixes(components))}
        weights = {c: float(rng.integers(1, 50)) for c in components}
        updates.append(ClientUpdate(100 + i, arrays, 10, weights))
    return updates


def _prefixes(components):
    out = []
    for c in components:
        kind, name = c.split(".")
        out.append({"encoder": f"encoders.{name}.", "fusion": "fusion.", "head": f"heads.{name}."}[kind])
    return out


def naive_reference(updates, shapes):
    """Per parameter, a weighted mean over the clients holding that parameter's component."""
    from fedmm.core.components import component_of

    out = {}
    for key in shapes:
        c = component_of(key)
        holders = [u for u in updates if c in u.component_weights]
        if holders:
            total = sum(u.component_weights[c] for u in holders)
            out[key] = sum(u.arrays[key].astype(np.float64) * u.component_weights[c] / total for u in holders)
    return out


def test_per_component_mean_matches_the_naive_reference():
    updates = make_updates(7)
    result = aggregate_updates(updates, component_layouts(SHAPES))
    expected = naive_reference(updates, SHAPES)
    assert result.arrays.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(result.arrays[key], expected[key], rtol=1e-5, atol=1e-6)


def test_a_component_nobody_holds_is_left_out():
    updates = [u for u in make_updates(6) if "encoder.text" not in u.component_weights]
    result = aggregate_updates(updates, component_layouts(SHAPES))
    assert "encoders.text.proj.weight" not in result.arrays
    assert "encoders.image.proj.weight" in result.arrays


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_client_is_dropped_from_every_component(bad_value):
    updates = make_updates(6)
    updates[2].arrays["heads.vqa.weight"][0, 0] = bad_value  # client 102 holds every component
    result = aggregate_updates(updates, component_layouts(SHAPES))
    assert [n for n, kind, _ in result.rejected] == [102]
    expected = naive_reference([u for u in updates if u.node_id != 102], SHAPES)
    for key in expected:
        np.testing.assert_allclose(result.arrays[key], expected[key], rtol=1e-5, atol=1e-6)


def test_largest_finite_values_do_not_overflow_the_mean():
    updates = make_updates(6)
    for u in updates:
        u.arrays["fusion.norm.weight"][:] = np.finfo(np.float32).max
    result = aggregate_updates(updates, component_layouts(SHAPES))
    assert result.rejected == []
    assert np.isfinite(result.arrays["fusion.norm.weight"]).all()


def test_stacking_follows_the_layout():
    layouts = component_layouts(SHAPES)
    layout = layouts["encoder.image"]
    assert layout.names == ("encoders.image.proj.bias", "encoders.image.proj.weight")
    arrays = {"encoders.image.proj.bias": np.arange(5, dtype=np.float32),
              "encoders.image.proj.weight": np.ones((5, 4), np.float32)}
    stacked = stack_component(layout, [arrays])
    assert stacked.shape == (1, 25)
    np.testing.assert_array_equal(stacked[0, :5], np.arange(5))


def test_a_component_with_bad_holders_names_exactly_them():
    layout = component_layouts({"fusion.w": (3,)})["fusion.shared"]
    good, bad = np.ones(3, np.float32), np.array([1, np.inf, 1], np.float32)
    out, dropped = aggregate_component(layout, ComponentInputs([1, 2, 3], [{"fusion.w": v} for v in (good, bad, good)], [1, 1, 1]))
    assert out == {} and dropped == [2]
