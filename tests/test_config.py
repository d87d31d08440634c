import re

import pytest

from optimum_dfq import BIT_PRESETS, BitPresetError, CheckpointError, ConfigError, DFQConfig, parse_bits
from optimum_dfq.version import FORMAT_VERSION


@pytest.mark.parametrize("preset", sorted(BIT_PRESETS))
def test_every_documented_preset_parses(preset):
    assert parse_bits(preset) == BIT_PRESETS[preset]


def test_presets_are_case_insensitive_and_generic():
    assert parse_bits("W5A7") == (5, 7)
    assert parse_bits("w2a16") == (2, None)


@pytest.mark.parametrize(
    "preset, message",
    [
        ("w4", "Unknown bit preset 'w4'"),
        ("int4", "Unknown bit preset 'int4'"),
        ("w9a8", "Weight bits 9"),
        ("w1a8", "Weight bits 1"),
        ("w4a9", "Activation bits 9"),
        ("w4a1", "Activation bits 1"),
    ],
)
def test_bad_presets_name_the_problem(preset, message):
    with pytest.raises(BitPresetError, match=message):
        parse_bits(preset)


def test_non_string_preset():
    with pytest.raises(BitPresetError, match="must be a string"):
        parse_bits(4)


def test_config_round_trips_through_dict_and_yaml(tmp_path):
    config = DFQConfig(bits="w3a4", scale_selector="median", post_softmax="log2", num_images=64, seed=7,
                       synthesizer_kwargs={"steps": 10})
    assert DFQConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "recipe.yaml"
    config.to_yaml(path)
    assert DFQConfig.from_yaml(path) == config
    assert config.weight_bits == 3 and config.activation_bits == 4


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="weight_bitz"):
        DFQConfig.from_dict({"weight_bitz": 4})
    with pytest.raises(ConfigError, match="'bitz' \\(did you mean 'bits'\\?\\)"):
        DFQConfig(bitz="w4a4")


@pytest.mark.parametrize("options, message", [
    ({"post_softmax": "tan_q"}, r"DFQConfig.post_softmax='tan_q' \(did you mean 'tanq'\?\) is not one of \["),
    ({"correction": {"kind": "afine"}}, r"correction\['kind'\]='afine' \(did you mean 'affine'\?\) is not one of"),
    ({"correction": {"knd": "affine"}}, r"Unknown key\(s\) 'knd' \(did you mean 'kind'\?\) in DFQConfig.correction"),
    ({"reconstruction": {"iters": 3}}, r"'iters' \(did you mean 'iterations'\?\) in DFQConfig.reconstruction"),
    ({"post_softmax": "zzz"}, r"DFQConfig.post_softmax='zzz' is not one of \["),  # nothing close: no guess
])
def test_a_misspelt_choice_or_option_key_is_named_with_the_closest_valid_one(options, message):
    with pytest.raises(ConfigError, match=message):
        DFQConfig(**options)


def test_preset_is_stored_in_canonical_form():
    assert DFQConfig(bits=" W4A08\n").bits == "w4a8"
    assert DFQConfig(bits="w04a16").bits == "w4a16"
    assert DFQConfig(bits="w4a08") == DFQConfig(bits="w4a8")


def test_sequences_in_option_dicts_round_trip_as_lists():
    config = DFQConfig(synthesizer="psaq", synthesizer_kwargs={"iterations": (2, 2), "tv_target": (1.0, 2.0)},
                       calibration_dataset={"path": "cifar10"})
    assert config.synthesizer_kwargs == {"iterations": [2, 2], "tv_target": [1.0, 2.0]}
    assert DFQConfig.from_dict(config.to_dict()) == config


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="num_images"):
        DFQConfig.from_dict({"num_images": "32"})
    with pytest.raises(ConfigError, match="quantize_attention"):
        DFQConfig(quantize_attention="yes")


def test_bad_choice_is_named():
    with pytest.raises(ConfigError, match="post_softmax='cubic'"):
        DFQConfig(post_softmax="cubic")


def test_newer_format_version_is_refused():
    with pytest.raises(CheckpointError, match="Upgrade optimum-dfq"):
        DFQConfig.from_dict({"format_version": FORMAT_VERSION + 1})


@pytest.mark.parametrize("version", ["1", 1.0, True, None])
def test_non_integer_format_version_is_called_malformed(version):
    with pytest.raises(CheckpointError, match="must be an integer") as info:
        DFQConfig.from_dict({"format_version": version})
    assert "Upgrade" not in str(info.value)


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        DFQConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a folder; pass a recipe file"):
        DFQConfig.from_yaml(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("bits: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        DFQConfig.from_yaml(bad)
    cases = {  # a key written twice (top level or nested) would let the last one win; tags could run code
        "twice": ("bits: w4a4\nseed: 1\nbits: w8a8\n", "not valid YAML.*duplicate key 'bits'"),
        "nested": ("synthesizer_kwargs:\n  tv_weight: 0.1\n  tv_weight: 0.2\n", "duplicate key 'tv_weight'"),
        "unsafe": ("bits: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    }
    for name, (text, message) in cases.items():
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(text)
        with pytest.raises(ConfigError, match=message):
            DFQConfig.from_yaml(recipe)


def test_replace_validates():
    config = DFQConfig()
    assert config.replace(bits="w8a8").bits == "w8a8"
    with pytest.raises(BitPresetError):
        config.replace(bits="w10a10")


@pytest.mark.parametrize("bits,expected", [("w8a8", "tanq"), ("w4a8", "tanq"), ("w6a6", "log_sqrt2"),
                                           ("w4a4", "log_sqrt2"), ("w3a4", "log_sqrt2"), ("w3a3", "tanq"),
                                           ("w4a16", "tanq")])
def test_auto_post_softmax_is_tanq_at_8_and_at_3_bits_and_log_sqrt2_between(bits, expected):
    assert DFQConfig(bits=bits).post_softmax_quantizer == expected
    assert DFQConfig(bits=bits, post_softmax="tanq").post_softmax_quantizer == "tanq"


@pytest.mark.parametrize("bits,expected", [("w8a8", "minmax"), ("w4a8", "minmax"), ("w6a6", "percentile_mse"),
                                           ("w4a4", "percentile_mse"), ("w3a3", "percentile_mse")])
def test_auto_activation_observer_is_minmax_at_8_bits_and_percentile_mse_below(bits, expected):
    assert DFQConfig(bits=bits).activation_observer == "auto"
    assert DFQConfig(bits=bits).activation_range_observer == expected
    assert DFQConfig(bits=bits, activation_observer="percentile_mse").activation_range_observer == "percentile_mse"
    with pytest.raises(ConfigError, match="activation_observer"):
        DFQConfig(bits=bits, activation_observer="max")


@pytest.mark.parametrize("bits", ["w8a8", "w4a8", "w6a6", "w4a4", "w3a3"])
def test_post_activation_inputs_keep_percentile_mse_unless_the_observer_is_explicit(bits):
    assert DFQConfig(bits=bits).post_activation_range_observer == "percentile_mse"
    assert DFQConfig(bits=bits, activation_observer="minmax").post_activation_range_observer == "minmax"


@pytest.mark.parametrize("name", ["weight_percentiles", "activation_percentiles"])
@pytest.mark.parametrize("values", [[0.3], [0.999, 1.5], [0.5], []])
def test_percentiles_outside_the_upper_half_are_refused(name, values):
    # a percentile p is an upper bound with lower bound 1 - p: p <= 0.5 would swap them, p > 1 is no percentile
    with pytest.raises(ConfigError, match=rf"DFQConfig\.{name}=.*non-empty list of values in \(0\.5, 1\]"):
        DFQConfig(**{name: values})
    assert getattr(DFQConfig(**{name: [0.51, 1.0]}), name) == [0.51, 1.0]


@pytest.mark.parametrize("name, values, message", [
    ("weight_percentiles", [0.999, "0.9999"], r"weight_percentiles.*'0\.9999' \(str\)"),
    ("activation_percentiles", [0.99, None], r"activation_percentiles.*None \(NoneType\)"),
    ("activation_percentiles", [True], r"activation_percentiles.*True \(bool\)"),
    ("modules_to_not_convert", ["classifier", 3], r"modules_to_not_convert.*3 \(int\)"),
])
def test_list_entries_of_the_wrong_type_are_named(name, values, message):
    # they reached a comparison or `str.startswith` deep inside (a TypeError / AttributeError without the field)
    with pytest.raises(ConfigError, match=message):
        DFQConfig(**{name: values})
    with pytest.raises(ConfigError, match=message):
        DFQConfig.from_dict({name: values})


def test_a_number_yaml_reads_as_text_gets_the_spelling_that_yaml_reads_as_a_number(tmp_path):
    # YAML 1.1 (PyYAML) reads 4e-5 (no dot) as the string '4e-5'; "must be a number" alone puzzles the user
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("reconstruction: {lr: 4e-5}\n")
    with pytest.raises(ConfigError, match=r"lr'\]='4e-5'.*YAML reads 4e-5 as text.*4\.0e-5"):
        DFQConfig.from_yaml(recipe)
    recipe.write_text("activation_percentiles: [0.999, 1e0]\n")
    with pytest.raises(ConfigError, match=r"'1e0' \(str\).*YAML reads 1e0 as text.*1\.0e\+0"):
        DFQConfig.from_yaml(recipe)
    recipe.write_text("reconstruction: {lr: 4.0e-5}\n")
    assert DFQConfig.from_yaml(recipe).reconstruction["lr"] == 4e-5


@pytest.mark.parametrize("line", ["reconstruction: {lr: 4e-5}", "correction: {kind: ridge, ridge_lambda: 1e2}",
                                  "correction: {kind: ridge, ridge_lambda: 2.5E3}", "activation_percentiles: [1e0]",
                                  "reconstruction: {iterations: 1e3}", "correction: {max_tokens: 8.192e3}"])
def test_the_spelling_suggested_for_a_number_yaml_reads_as_text_is_accepted(line, tmp_path):
    # YAML 1.1 also needs a sign in the exponent: the hint suggested 1.0e2 for 1e2, which YAML reads as text again;
    # an integer field needs the integer itself (1000 for 1e3: a float is refused there)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(line + "\n")
    with pytest.raises(ConfigError, match="YAML reads .* as text: write") as info:
        DFQConfig.from_yaml(recipe)
    spelling = re.search(r"as text: write (\S+) ", str(info.value)).group(1)
    recipe.write_text(line.replace(re.search(r"[0-9.]+[eE][-+]?[0-9]+", line).group(0), spelling) + "\n")
    DFQConfig.from_yaml(recipe)


@pytest.mark.parametrize("options", [{"correction": {"ridge_lambda": float("nan")}},
                                     {"correction": {"ridge_lambda": float("inf")}},
                                     {"reconstruction": {"lr": float("nan")}},
                                     {"reconstruction": {"lr": float("inf")}}])
def test_non_finite_option_numbers_are_refused(options):
    # NaN passed both `value < minimum` checks and an infinite learning rate or ridge strength was accepted
    with pytest.raises(ConfigError, match="must be a finite number"):
        DFQConfig(**options)


def test_an_invalid_regular_expression_in_modules_to_not_convert_is_named():
    with pytest.raises(ConfigError, match=r"modules_to_not_convert entry 're:\[' is not a valid regular expression"):
        DFQConfig(modules_to_not_convert=["re:["])


def test_unknown_recipe_key_suggests_the_close_key():
    with pytest.raises(ConfigError, match=r"'synthesiser' \(did you mean 'synthesizer'\?\)"):
        DFQConfig.from_dict({"synthesiser": "gaussian"})


@pytest.mark.parametrize("dataset, key", [({"path": 3}, "path"), ({"path": None}, "path"), ({"path": ""}, "path"),
                                          ({"path": "data.parquet", "split": 3}, "split"),
                                          ({"path": "data.parquet", "name": ["x"]}, "name"),
                                          ({"path": "data.parquet", "image_column": ""}, "image_column")])
def test_calibration_dataset_values_must_be_names(dataset, key):
    # a number or null path reached pathlib with a TypeError, an empty one datasets with an IndexError, when quantizing
    with pytest.raises(ConfigError, match=rf"DFQConfig\.calibration_dataset\['{key}'\]=.* must be a non-empty string"):
        DFQConfig(calibration_dataset=dataset)


def test_an_unknown_key_written_by_a_newer_release_asks_for_an_upgrade():
    # a checkpoint made with a later release (same format version, one more option) got "Unknown DFQConfig key(s)
    # 'new_option'. Valid keys: [...]", which reads like a hand-edited config
    written = {**DFQConfig().to_dict(), "new_option": 1, "library_version": "99.0.0"}
    with pytest.raises(CheckpointError, match=r"'new_option'.*written by optimum_dfq 99\.0\.0.*pip install -U "
                                              r"optimum-dfq"):
        DFQConfig.from_dict(written)
    with pytest.raises(ConfigError, match="Unknown DFQConfig key") as info:  # same or older release: a typo
        DFQConfig.from_dict({**DFQConfig().to_dict(), "new_option": 1})
    assert not isinstance(info.value, CheckpointError)


def test_an_unknown_option_or_value_written_by_a_newer_release_asks_for_an_upgrade():
    # a later release's new option inside correction / reconstruction (as this one added correction['ridge_fit']) or
    # new choice got "Unknown key(s) ['...'] in DFQConfig.correction", which reads like a hand-edited config too
    for change in ({"correction": {"kind": "ridge", "new_option": 1}}, {"correction": {"kind": "newer"}}):
        written = {**DFQConfig().to_dict(), **change, "library_version": "99.0.0"}
        with pytest.raises(CheckpointError, match=r"written by optimum_dfq 99\.0\.0.*pip install -U optimum-dfq"):
            DFQConfig.from_dict(written)
        with pytest.raises(ConfigError) as info:  # same or older release: a typo
            DFQConfig.from_dict({**DFQConfig().to_dict(), **change})
        assert not isinstance(info.value, CheckpointError)
