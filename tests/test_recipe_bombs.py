"""Recipes and ``--set`` values as a hostile file would try them (issue 34, item 4): aliases refused, duplicate
keys an error naming the key and its lines, deep nesting refused, a size bound checked before parsing, bounded
error lines, target patterns bounded and compiled once; and calibration windows (item 6): ``seq_len`` below 8
refused, windows that must overlap said in one ``CompressorWarning``."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from compressor.calibration.text import random_windows
from compressor.config import safe_yaml
from compressor.errors import QUOTE_LIMIT, CompressorError, CompressorWarning, quote
from compressor.model.targets import MAX_PATTERNS, select
from compressor.plan import recipe as recipes

ROOT = Path(__file__).resolve().parent.parent
LINE_LIMIT = 400  # what any error line here may reach: a path, a few words and ~100 characters of a value


def billion_laughs(levels: int = 30, where: str = "value") -> str:
    """A recipe whose aliases expand to 2**levels items, in ``where``: a config value, targets or calibration."""
    lines = ["a0: &a0 [x, x]"] + [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, levels)]
    bomb = f"*a{levels - 1}"
    step = {"value": f"{{method: lord, config: {{ratio: {bomb}}}}}",
            "targets": f"{{method: lord, targets: {bomb}}}",
            "calibration": "{method: lord}"}[where]
    calibration = f"calibration: {{dataset: {bomb}}}\n" if where == "calibration" else ""
    return "\n".join(lines) + f"\n{calibration}steps:\n  - {step}\n"


def refused(text: str) -> str:
    with pytest.raises(CompressorError) as caught:
        safe_yaml.load(text, "recipe r.yaml")
    message = str(caught.value)
    assert "\n" not in message and len(message) <= LINE_LIMIT, message
    return message


@pytest.mark.parametrize("where", ["value", "targets", "calibration"])
def test_aliases_are_refused_with_their_line(where):
    message = refused(billion_laughs(where=where))
    assert "line 2" in message and "'*a0'" in message and "aliases are not allowed" in message


def test_a_merge_of_an_anchor_is_an_alias_too():
    assert "alias '*base'" in refused("base: &base {ratio: 0.2}\nlord:\n  <<: *base\n")


@pytest.mark.parametrize("text, key, lines", [
    ("steps:\n  - method: lord\n    config: {ratio: 0.2, ratio: 0.9}\n", "'ratio'", ("line 3", "also on line 3")),
    ("steps:\n  - method: lord\n    config:\n      ratio: 0.2\n      ratio: 0.9\n", "'ratio'",
     ("line 5", "also on line 4")),
    ("steps: []\ncalibration: {}\nsteps:\n  - method: lord\n", "'steps'", ("line 3", "also on line 1")),
    ("1: a\n1: b\n", "1", ("line 2", "also on line 1")),
])
def test_a_duplicate_key_names_the_key_and_both_lines(text, key, lines):
    message = refused(text)
    assert f"duplicate key {key}" in message
    for fragment in lines:
        assert fragment in message


@pytest.mark.parametrize("text", ["a: " + "[" * 100_000 + "]" * 100_000, "a: " + "{b: " * 5000 + "1" + "}" * 5000])
def test_deep_nesting_is_refused_not_a_recursion_error(text):
    assert f"nested more than {safe_yaml.MAX_DEPTH} levels deep" in refused(text)


def test_equal_keys_in_different_mappings_are_fine():
    data = safe_yaml.load("a: {ratio: 1}\nb: {ratio: 2}\n", "recipe")
    assert data == {"a": {"ratio": 1}, "b": {"ratio": 2}}


def test_a_huge_duplicate_key_is_quoted_short():
    key = "k" * 100_000
    message = refused(f"? {key}\n: 1\n? {key}\n: 2\n")  # explicit keys: a plain one is at most 1024
    assert "100,000 characters" in message


def test_a_syntax_error_is_one_short_line():
    message = refused("steps: [\n" + "x" * 200_000)
    assert message.startswith("recipe r.yaml: invalid YAML (line ")


def test_a_recipe_over_the_size_bound_is_refused_before_parsing(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("steps:\n  - method: lord\n    targets:\n" + "      - 're:(a|b)*c'\n" * 2_000_000)  # 40 MB
    start = time.perf_counter()
    size = f"{path.stat().st_size:,}"
    with pytest.raises(CompressorError, match=rf"big\.yaml: {size} bytes, over the 1 MiB a recipe may hold"):
        recipes.load(str(path))
    assert time.perf_counter() - start < 1


def test_a_recipe_at_the_bound_is_read(tmp_path):
    path = tmp_path / "r.yaml"
    text = "steps:\n  - method: lord\n"
    path.write_text(text + "#" * (safe_yaml.MAX_BYTES - len(text) - 1) + "\n")
    assert recipes.load(str(path)).steps[0].method == "lord"


def test_overrides_are_read_by_the_same_loader():
    with pytest.raises(CompressorError, match=r"override .*alias '\*a'"):
        recipes.load("lord", ["steps.0.targets=[&a q_proj, *a]"])
    with pytest.raises(CompressorError, match="duplicate key 'seed'"):
        recipes.load("lord", ["calibration={seed: 1, seed: 2}"])


def test_too_many_target_patterns_are_refused():
    targets = [f"layers.{i}.mlp" for i in range(MAX_PATTERNS + 1)]
    with pytest.raises(CompressorError, match=f"step 0: {MAX_PATTERNS + 1:,} target and ignore patterns") as caught:
        recipes.parse({"steps": [{"method": "lord", "targets": targets}]})
    assert len(str(caught.value)) <= LINE_LIMIT


def test_a_too_long_pattern_is_refused_and_quoted_short():
    with pytest.raises(CompressorError, match="longer than the 1,000 characters") as caught:
        recipes.parse({"steps": [{"method": "lord", "targets": ["re:" + "a" * 5000]}]})
    assert len(str(caught.value)) <= LINE_LIMIT


def test_a_huge_method_name_is_quoted_short():
    from compressor.methods import registry

    with pytest.raises(CompressorError, match="unknown method") as caught:
        registry.create("x" * 1_000_000, {})
    assert len(str(caught.value)) <= LINE_LIMIT


def test_patterns_match_as_before_and_each_regex_is_compiled_once(monkeypatch):
    names = [f"model.layers.{i}.{part}" for i in range(12) for part in ("self_attn.q_proj", "mlp.down_proj")]
    assert select(names, ["q_proj"], []) == names[::2]
    assert select(names, ["layers.1"], ["mlp"]) == ["model.layers.1.self_attn.q_proj"]
    assert select(names, ["re:layers\\.1\\d\\."], ["down_proj"]) == [
        "model.layers.10.self_attn.q_proj", "model.layers.11.self_attn.q_proj"]
    assert select(names, ["proj", "layers.1.mlp.down"], []) == []  # dot-bounded parts only
    assert select(names, [], ["self_attn", "re:layers\\.[1-9]"]) == ["model.layers.0.mlp.down_proj"]
    compiled = []
    original = __import__("re").compile
    monkeypatch.setattr("compressor.model.targets.re.compile", lambda p, *a: compiled.append(p) or original(p, *a))
    patterns = [f"re:^model\\.layers\\.{i}\\.mlp\\.down_proj$" for i in range(MAX_PATTERNS)]
    assert select(names, patterns, []) == names[1::2]
    assert len(compiled) == MAX_PATTERNS  # not once per name


def test_quote_bounds_any_value():
    assert quote("abc") == "'abc'" and quote(5) == "5"
    long = quote("x" * 10_000)
    assert len(long) < QUOTE_LIMIT + 30 and long.endswith("(10,000 characters)")
    assert quote(list(range(10_000))).endswith("characters)")


BOMB_SCRIPT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from compressor.errors import CompressorError
from compressor.plan import recipe
for path in sys.argv[1:]:
    try:
        recipe.load(path)
    except CompressorError as exc:
        print(len(str(exc)), str(exc)[:200])
    else:
        print("accepted", path)
"""


def test_alias_bombs_are_refused_under_a_memory_and_time_limit(tmp_path):
    """The whole recipe path (read, overrides, parse) in a process of 2 GiB of address space (the imports take
    about 1): a bomb expanded would need hundreds of gigabytes, or hang printing."""
    paths = []
    for where in ("value", "targets", "calibration"):
        paths.append(tmp_path / f"{where}.yaml")
        paths[-1].write_text(billion_laughs(where=where))
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, *map(str, paths)], capture_output=True, text=True,
                          timeout=120, env=env, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CPU, (100, 100)))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 3, done.stdout
    for line in lines:
        length, message = line.split(" ", 1)
        assert int(length) <= LINE_LIMIT and "aliases are not allowed" in message, line


# -- item 6: calibration windows ---------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [["calibration.seq_len=1"], ["calibration.seq_len=7"]])
def test_seq_len_below_eight_is_refused_naming_the_option(overrides):
    with pytest.raises(CompressorError, match=r"--seq-len, calibration\.seq_len\) must be ≥ 8.*got [17]$"):
        recipes.load("lord", overrides)
    assert recipes.load("lord", ["calibration.seq_len=8"]).calibration.seq_len == 8


def test_a_steps_own_seq_len_is_held_to_the_same_minimum():
    with pytest.raises(CompressorError, match=r"step 0 calibration: seq_len .* must be ≥ 8"):
        recipes.parse({"steps": [{"method": "lord", "calibration": {"seq_len": 4}}]})


def test_overlapping_windows_are_said_once_with_the_token_count():
    ids = torch.arange(300)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        windows = random_windows(ids, 4, 128, 0, "c.txt")
        random_windows(ids, 2, 128, 0, "c.txt")  # 256 ≤ 300: no overlap forced
    assert windows.shape == (4, 128)
    said = [str(w.message) for w in caught if issubclass(w.category, CompressorWarning)]
    assert said == ["calibration text c.txt has 300 tokens, fewer than n_samples × seq_len = 4 × 128 = 512: the "
                    "windows overlap (at most 300 distinct tokens among 512); give a longer text, or fewer or "
                    "shorter windows"]


def test_the_api_relays_a_calibration_warning_once(model_dirs, tokenizer, tmp_path):
    from compressor.api import compress
    from compressor.calibration.text import tokenize

    words = ["word"]
    while tokenize(tokenizer, " ".join(words)).numel() < 80:  # between one window (32) and four (128)
        words.append(f"w{len(words)}")
    text = tmp_path / "c.txt"
    text.write_text(" ".join(words))
    said = []
    compress(str(model_dirs["llama"]), "lord", tmp_path / "out", progress=False, warn=said.append,
             overrides=["calibration.n_samples=4", "calibration.seq_len=32", "calibration.batch_size=2",
                        f"calibration.dataset={text}"])
    overlap = [line for line in said if "windows overlap" in line]
    assert len(overlap) == 1 and str(text) in overlap[0], said
