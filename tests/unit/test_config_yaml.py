"""services.common.config.load_yaml: configs load as yaml.safe_load does, within bounds an alias
bomb or a self-referring document cannot slip past."""
from __future__ import annotations

import gc
import warnings

import pytest

from services.common.config import MAX_YAML_BYTES, MAX_YAML_VALUES, load_yaml, read_config


def test_a_config_loads_as_safe_load_does_anchors_included():
    text = "base: &base {lr: 1.0e-5, n: 4}\nppo: *base\nsteps: 3\nlist: [*base, *base]\n"
    import yaml
    assert load_yaml(text, "c") == yaml.safe_load(text)
    assert load_yaml("", "c") is None


def test_aliases_count_as_what_they_expand_to():
    # 10 x 10 x 10 x ... : the document is small, its expansion is not
    levels = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else '1'] * 10)}]\n" for i in range(6))
    with pytest.raises(ValueError, match=f"c expands to more than {MAX_YAML_VALUES} values"):
        load_yaml(levels, "c")
    four_levels = levels.split("l4:", 1)[0]  # 10^4 + 10^3 + ... values: within the bound, and built
    assert load_yaml(four_levels, "c")["l3"][9][9][9] == [1] * 10


def test_a_document_that_contains_itself_is_refused():
    with pytest.raises(ValueError, match="refers to itself"):
        load_yaml("a: &a [1, *a]\n", "c")


def test_deep_nesting_is_an_error_not_a_crash():
    assert load_yaml("[" * 50 + "]" * 50, "c") is not None
    with pytest.raises(ValueError, match="c nests lists or mappings too deeply"):
        load_yaml("[" * 5000 + "]" * 5000, "c")


def test_a_file_too_large_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (MAX_YAML_BYTES + 1))
    with pytest.raises(ValueError, match=f"--config big is {MAX_YAML_BYTES + 1} bytes"):
        read_config(path, "--config big")


def test_reading_a_serve_config_closes_the_file(tmp_path):
    """cli.expand_serve_config used to leave the file to the garbage collector."""
    from services.cli import expand_serve_config

    path = tmp_path / "reward.yaml"
    path.write_text("max_pairs: 8\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        argv = expand_serve_config(["serve", "reward", "--config", str(path)])
        gc.collect()
    assert argv == ["serve", "reward", "--max-pairs", "8"]
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
