"""The libraries cpt follows closely are installed within the range the suite was run on; outside it,
the failure names the release and what rests on it."""
from dependencies import FEATURES, declared_ranges, outside_tested_range


def test_every_fast_moving_library_declares_a_tested_upper_bound():
    ranges = declared_ranges()
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        assert "<" in ranges.get(name, ""), f"{name} needs an upper bound in pyproject.toml: {ranges.get(name)}"


def test_installed_versions_are_within_the_tested_ranges():
    assert not outside_tested_range(), "\n".join(outside_tested_range())


def test_a_release_outside_the_range_is_named_with_what_it_breaks(monkeypatch):
    import dependencies

    monkeypatch.setattr(dependencies, "installed", lambda name: "99.0.0" if name == "transformers" else None)
    (line,) = outside_tested_range()
    assert line.startswith("transformers 99.0.0 is outside the tested range") and "compiled decoder layers" in line


def test_the_feature_map_names_existing_test_modules():
    from pathlib import Path

    here = Path(__file__).parent
    assert all((here / f"{mod}.py").is_file() for mod in FEATURES), [m for m in FEATURES if not (here / f"{m}.py").is_file()]
