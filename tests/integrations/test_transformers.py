"""`from_pretrained` / `save_pretrained` of optimum_dfq checkpoints through transformers' own loading."""

from __future__ import annotations

import importlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageClassification
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

import optimum_dfq
from optimum_dfq import CheckpointError, ConfigError, DFQConfig
from optimum_dfq.calibration import iter_quantizers
from optimum_dfq.formats.checkpoint import METADATA_KEY
from optimum_dfq.integrations import transformers as integration

from ..conftest import tiny_vit
from .conftest import ROUND_TRIP_CASES, logits, quantize, quantizer_layout, run_python

ROUND_TRIP_SCRIPT = """
import json, sys, tempfile, torch
import optimum_dfq  # registers the quantization method
from transformers import AutoModelForImageClassification

index, pixels = json.load(open(sys.argv[1] if len(sys.argv) > 1 else {index!r})), torch.load({pixels!r})
out = {{}}
for name, folder in index.items():
    model, info = AutoModelForImageClassification.from_pretrained(folder, output_loading_info=True)
    with torch.no_grad():
        first = model(pixel_values=pixels).logits
    with tempfile.TemporaryDirectory() as again:  # second save/load cycle, from the reloaded model
        model.save_pretrained(again)
        reloaded = AutoModelForImageClassification.from_pretrained(again)
        with torch.no_grad():
            second = reloaded(pixel_values=pixels).logits
    state = model.state_dict()
    out[name] = {{
        "first": first, "second": second, "load_report": sum(len(v) for v in info.values()),
        "quantizer": type(model.hf_quantizer).__name__, "attention": model.config._attn_implementation,
        "packed_dtypes": sorted({{str(t.dtype) for k, t in state.items() if k.endswith("weight_packed")}}),
        "float_linear_weights": [k for k in state if k.endswith(("q_proj.weight", "fc1.weight", "classifier.weight"))],
    }}
torch.save(out, {out!r})
"""


@pytest.fixture(scope="module")
def fresh_process_results(round_trip_checkpoints, pixels, tmp_path_factory):
    """Loads every round-trip checkpoint twice (save/load cycles) in ONE fresh interpreter."""
    work = tmp_path_factory.mktemp("fresh")
    index = work / "index.json"
    index.write_text(json.dumps({k: v["dir"] for k, v in round_trip_checkpoints.items()}))
    out = work / "results.pt"
    result = run_python(ROUND_TRIP_SCRIPT.format(index=str(index), pixels=str(pixels[1]), out=str(out)))
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out)


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_CASES))
def test_fresh_process_load_predicts_exactly_like_the_quantized_model(name, round_trip_checkpoints,
                                                                      fresh_process_results):
    expected = round_trip_checkpoints[name]["logits"]
    got = fresh_process_results[name]
    assert got["quantizer"] == "DFQHfQuantizer"
    assert got["attention"] == "optimum_dfq"
    assert got["load_report"] == 0  # no missing, unexpected or mismatched key
    assert got["packed_dtypes"] == ["torch.uint8"] and got["float_linear_weights"] == []
    assert (got["first"] - expected).abs().max().item() == 0.0
    assert (got["second"] - expected).abs().max().item() == 0.0


@pytest.mark.parametrize("name", ["vit-w4a4", "deit_teacher-w8a8", "swin-w4a8"])
def test_loaded_model_rebuilds_every_quantizer_with_its_range_estimator(name, round_trip_checkpoints):
    # the post-activation estimator (fc2's input) is chosen by dataflow at quantization time, so the checkpoint
    # must carry which Linears got it; a reload that rebuilt them with the general estimator would recalibrate
    # differently and print a card that does not match the model
    saved = round_trip_checkpoints[name]
    loaded = AutoModelForImageClassification.from_pretrained(saved["dir"])
    assert quantizer_layout(loaded) == saved["layout"]
    observers = {observer for _, _, observer in saved["layout"].values()}
    expected = {"percentile_mse", "minmax"} if name.endswith("a8") else {"percentile_mse"}
    assert expected <= observers  # at 8 activation bits only fc2's inputs use percentile-MSE


def test_checkpoint_written_before_activation_consumers_were_recorded_still_loads(round_trip_checkpoints, pixels,
                                                                                tmp_path):
    old = tmp_path / "old"
    shutil.copytree(round_trip_checkpoints["vit-w8a8"]["dir"], old)
    path = old / "model.safetensors"
    with safe_open(path, "pt") as handle:
        header = handle.metadata()
    payload = json.loads(header[METADATA_KEY])
    assert payload["plan"].pop("activation_consumers")  # the layout of the 0.x checkpoints on disk
    save_file(load_file(path), path, metadata={**header, METADATA_KEY: json.dumps(payload)})
    loaded = AutoModelForImageClassification.from_pretrained(old)
    assert torch.equal(logits(loaded, pixels[0]), round_trip_checkpoints["vit-w8a8"]["logits"])
    activation_observers = {q.observer for name, q in iter_quantizers(loaded)
                            if getattr(q, "observer", None) and not name.endswith("weight_quantizer")}
    assert activation_observers == {"minmax"}  # no record: every input gets the general 8-bit estimator


def test_checkpoint_saved_with_the_earlier_attention_name_still_loads(round_trip_checkpoints, pixels, tmp_path):
    old = shutil.copytree(round_trip_checkpoints["vit-w8a8"]["dir"], tmp_path / "old")
    config = json.loads((old / "config.json").read_text())
    config["attn_implementation"] = "optimum_dfq"  # what checkpoints carried before the self-explaining name
    (old / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForImageClassification.from_pretrained(old)
    assert torch.equal(logits(loaded, pixels[0]), round_trip_checkpoints["vit-w8a8"]["logits"])
    loaded.save_pretrained(tmp_path / "again")  # a re-save writes the current name
    resaved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert resaved["attn_implementation"] == "optimum_dfq (requires import optimum_dfq before from_pretrained)"


def test_checkpoint_holds_packed_codes_and_full_config(round_trip_checkpoints):
    folder = round_trip_checkpoints["vit-w3a4"]["dir"]
    config = json.loads(Path(folder, "config.json").read_text())
    # the stored config is the run's, with input_range="auto" resolved (no image processor: a calibrated range)
    expected = DFQConfig(bits="w3a4", num_images=8, synthesizer="gaussian", input_range="calibrated")
    assert config["quantization_config"] == expected.to_dict()
    # the guard against loading without the import: transformers quotes this name when it refuses it
    assert config["attn_implementation"] == "optimum_dfq (requires import optimum_dfq before from_pretrained)"
    with safe_open(f"{folder}/model.safetensors", "pt") as handle:
        keys = set(handle.keys())
        packed = handle.get_tensor("vit.encoder.layer.0.intermediate.dense.weight_packed")  # legacy name on disk
        assert json.loads(handle.metadata()[METADATA_KEY])["plan"]["layernorm_consumers"]
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (64, 32 * 3 // 8)  # fc1: 64 x 32 at 3 bits
    assert "vit.encoder.layer.0.intermediate.dense.weight" not in keys
    assert "vit.encoder.layer.0.intermediate.dense.weight_quantizer.scale" in keys
    assert "vit.encoder.layer.1.attention.dfq_attention.probs.scale" in keys


def test_loading_without_import_fails_instead_of_returning_garbage(round_trip_checkpoints):
    folder = round_trip_checkpoints["vit-w4a4"]["dir"]
    result = run_python(f"""
        import sys
        from transformers import AutoModelForImageClassification, pipeline
        for load in (lambda: AutoModelForImageClassification.from_pretrained({folder!r}),
                     lambda: pipeline("image-classification", model={folder!r})):
            try:
                load()
                print("LOADED")
            except ValueError as err:
                print("REFUSED:", str(err).replace("\\n", " "))
        print("optimum_dfq imported:", "optimum_dfq" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "LOADED" not in lines
    refused = [line for line in lines if line.startswith("REFUSED:")]
    assert len(refused) == 2
    # transformers' own error, which quotes the saved name: it names the package and the missing import
    assert all('Specified `attn_implementation="optimum_dfq (requires import optimum_dfq before from_pretrained)"` '
               "is not supported" in r for r in refused)
    assert "optimum_dfq imported: False" in lines
    assert "Unknown quantization type, got optimum_dfq" in result.stderr


def test_checkpoint_whose_config_lost_its_quantization_config_refuses_to_run(vit_w4a4, tmp_path, pixels):
    _, folder = vit_w4a4
    stripped = shutil.copytree(folder, tmp_path / "stripped")
    config = json.loads((stripped / "config.json").read_text())
    del config["quantization_config"]  # e.g. rewritten by a config tool; attn_implementation stays
    (stripped / "config.json").write_text(json.dumps(config))
    model = AutoModelForImageClassification.from_pretrained(stripped)  # transformers: random float weights
    assert not getattr(model, "is_quantized", False)
    with pytest.raises(CheckpointError, match=r"no `quantization_config`.*random.*Restore `quantization_config`"):
        logits(model, pixels[0])


def test_dequantize_is_refused_pointing_to_the_float_checkpoint(vit_w4a4, pixels):
    _, folder = vit_w4a4
    model = AutoModelForImageClassification.from_pretrained(folder)
    before = logits(model, pixels[0])
    with pytest.raises(NotImplementedError, match=r"cannot be dequantized: .* 4-bit integer codes.*cannot be "
                                                  r"recovered.*Load the float checkpoint"):
        model.dequantize()
    assert model.is_quantized and torch.equal(logits(model, pixels[0]), before)  # left unchanged
    model.hf_quantizer.provenance = {**model.hf_quantizer.provenance, "base_model": "google/vit-base-patch16-224"}
    with pytest.raises(NotImplementedError, match=r"quantized from \('google/vit-base-patch16-224'\) with "
                                                  "from_pretrained"):
        model.dequantize()


def test_registration_is_idempotent_and_survives_reload():
    integration.register_quantization_method()
    importlib.reload(optimum_dfq)
    reloaded = importlib.reload(integration)
    reloaded.register_quantization_method()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["optimum_dfq"] is DFQConfig
    assert AUTO_QUANTIZER_MAPPING["optimum_dfq"] is reloaded.DFQHfQuantizer


def test_registration_refuses_a_foreign_claim(monkeypatch):
    class Impostor(integration.HfQuantizer):
        pass

    monkeypatch.setitem(AUTO_QUANTIZER_MAPPING, "optimum_dfq", Impostor)
    with pytest.raises(optimum_dfq.DFQError, match="two packages claim the same quant_method"):
        integration.register_quantization_method()


def test_requested_attention_is_overridden(vit_w4a4, pixels, caplog):
    qmodel, folder = vit_w4a4
    with caplog.at_level("WARNING", logger="optimum_dfq"):
        model = AutoModelForImageClassification.from_pretrained(folder, attn_implementation="sdpa")
    assert "run the 'optimum_dfq' attention implementation" in caplog.text
    assert "ignoring attn_implementation='sdpa'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="optimum_dfq"):
        AutoModelForImageClassification.from_pretrained(folder)  # the saved attention name: nothing to say
    assert "ignoring attn_implementation" not in caplog.text
    assert model.config._attn_implementation == "optimum_dfq"
    assert torch.equal(logits(model, pixels[0]), logits(qmodel, pixels[0]))



def test_a_config_asking_for_attentions_still_saves_and_attentions_stay_available(tmp_path, pixels, caplog):
    # transformers refuses to save output_attentions=True with any attention implementation but eager
    model = tiny_vit()
    model.set_attn_implementation("eager")
    model.config.output_attentions = True  # valid with eager attention: the float model returns its attentions
    with caplog.at_level("WARNING", logger="optimum_dfq"):
        qmodel = quantize(lambda: model, "w4a4")
    assert model.config.output_attentions and not qmodel.config.output_attentions
    assert "output_attentions=True" in caplog.text
    qmodel.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    with torch.no_grad():
        expected = qmodel(pixel_values=pixels[0], output_attentions=True)
        got = loaded(pixel_values=pixels[0], output_attentions=True)
    assert len(got.attentions) == model.config.num_hidden_layers
    assert all(torch.equal(a, b) for a, b in zip(got.attentions, expected.attentions, strict=True))
    assert torch.equal(got.logits, expected.logits)


def test_loading_with_the_in_memory_models_config(vit_w4a4, pixels):
    qmodel, folder = vit_w4a4
    assert isinstance(qmodel.config.quantization_config, DFQConfig)
    model = AutoModelForImageClassification.from_pretrained(folder, config=qmodel.config)
    assert torch.equal(logits(model, pixels[0]), logits(qmodel, pixels[0]))
    # quantize()'s model is marked as quantized like a loaded one (transformers and Trainer read these)
    assert qmodel.is_quantized and model.is_quantized
    assert qmodel.quantization_method == model.quantization_method == "optimum_dfq"
    assert qmodel.config.quantization_config.get("bits") == "w4a4"
    assert qmodel.config.quantization_config.get("quant_method") == "optimum_dfq"
    assert qmodel.config.quantization_config.get("not_a_field", 3) == 3

# ---------------------------------------------------------------------------------------------- broken checkpoints
def _rewrite(folder, drop=None, add=None, flip=None, metadata=True):
    path = folder / "model.safetensors"
    with safe_open(path, "pt") as handle:
        header = handle.metadata()
    tensors = load_file(path)
    if drop:
        del tensors[drop]
    if add:
        tensors[add] = torch.zeros(3)
    if flip:
        tensors[flip] = tensors[flip].clone()
        tensors[flip].view(-1)[0] ^= 1
    save_file(tensors, path, metadata=header if metadata else {"format": "pt"})


def _truncate(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])


def _corrupt_header(folder):
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[0:8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def _newer_format(folder):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (folder / "config.json").write_text(json.dumps(config))


BROKEN = {
    "corrupt header": (_corrupt_header, "corrupt or truncated.*header too large"),
    "truncated file": (_truncate, "corrupt or truncated.*not fully covered"),
    "missing packed weight": (lambda f: _rewrite(f, drop="vit.encoder.layer.0.attention.attention.query.weight_packed"),
                              r"incomplete: 1 tensor\(s\).*vit\.layers\.0\.attention\.q_proj\.weight_packed"),
    "missing quantizer scale": (lambda f: _rewrite(f, drop="vit.encoder.layer.1.attention.dfq_attention.probs.scale"),
                                r"incomplete.*vit\.layers\.1\.attention\.dfq_attention\.probs\.scale"),
    "extra tensor": (lambda f: _rewrite(f, add="vit.encoder.layer.0.extra"),
                     "tensors the quantized model does not have: vit.encoder.layer.0.extra"),
    "flipped data bit": (lambda f: _rewrite(f, flip="vit.encoder.layer.1.output.dense.weight_packed"),
                         "SHA-256 mismatch.*corrupt"),
    "metadata stripped": (lambda f: _rewrite(f, metadata=False), "has no 'optimum_dfq' metadata"),
    "newer format version": (_newer_format, "format_version=99.*Upgrade optimum-dfq"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoint_raises_a_clear_error(case, vit_w4a4, tmp_path):
    _, folder = vit_w4a4
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    damage, message = BROKEN[case]
    damage(broken)
    with pytest.raises(CheckpointError, match=message):
        AutoModelForImageClassification.from_pretrained(broken)


# ---------------------------------------------------------------------------------------------- transformers options
@pytest.mark.parametrize("implementation", ["sdpa", "eager", None, {"": "sdpa"},
                                            {"": "optimum_dfq", "sub": {"": "sdpa"}}])  # a nested sub-config dict
def test_switching_a_quantized_model_to_another_attention_is_refused(implementation, vit_w4a4, pixels):
    # the attention quantizers (Q, K, V, softmax output) live in the "optimum_dfq" attention: SDPA or eager would
    # skip them, and the model predicted differently without a word
    qmodel, folder = vit_w4a4
    expected = logits(qmodel, pixels[0])
    loaded = AutoModelForImageClassification.from_pretrained(folder)
    for model in (qmodel, loaded, loaded.vit):
        with pytest.raises(ConfigError, match=r"runs the 'optimum_dfq' attention.*quantizers.*would skip them.*"
                                              r"Keep the model's attention.*to_onnx"):
            model.set_attn_implementation(implementation)
        assert model.config._attn_implementation == "optimum_dfq"
    loaded.set_attn_implementation("optimum_dfq")  # what it runs already: allowed
    for model in (qmodel, loaded):
        assert torch.equal(logits(model, pixels[0]), expected)


def test_disk_offload_is_refused_instead_of_blamed_on_the_checkpoint(vit_w4a4, tmp_path):
    # offloaded tensors stay on the meta device: the load check used to call the checkpoint incomplete and damaged
    _, folder = vit_w4a4
    for options in ({"device_map": {"": "disk"}}, {"device_map": "auto", "max_memory": {"cpu": "1KB"}}):
        with pytest.raises(ConfigError, match=r"cannot be offloaded to disk: device_map puts .* on 'disk'.*"
                                              r"device_map=\"cpu\""):
            AutoModelForImageClassification.from_pretrained(folder, offload_folder=tmp_path, **options)
    with pytest.raises(ConfigError, match="device_map puts the whole model on 'disk'"):
        AutoModelForImageClassification.from_pretrained(folder, offload_folder=tmp_path, device_map={"": "disk"})


def test_save_pretrained_refuses_a_state_dict_that_is_not_the_model_s(vit_w4a4, tmp_path, pixels):
    # transformers takes the state dict from the quantizer: a different `state_dict=` was dropped without a word
    qmodel, _ = vit_w4a4
    qmodel.save_pretrained(tmp_path / "same", state_dict=qmodel.state_dict())  # what accelerate passes: fine
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "same")
    assert torch.equal(logits(loaded, pixels[0]), logits(qmodel, pixels[0]))
    edited = {name: tensor.clone() for name, tensor in qmodel.state_dict().items()}
    edited["classifier.bias"] += 1
    for args, kwargs in (((), {"state_dict": edited}), ((True, edited), {})):
        with pytest.raises(ConfigError, match=r"state_dict=\.\.\.\) got a state dict that differs from the "
                                              r"model's own tensors: classifier\.bias\..*"
                                              r"model\.load_state_dict\(state_dict\)"):
            qmodel.save_pretrained(tmp_path / "edited", *args, **kwargs)
    assert not (tmp_path / "edited" / "model.safetensors").exists()


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_save_pretrained_refuses_a_state_dict_with_other_tensor_names(change, vit_w4a4, tmp_path):
    qmodel, _ = vit_w4a4
    state_dict = dict(qmodel.state_dict())
    if change == "extra":
        state_dict["classifier.extra"] = torch.zeros(3)
    else:
        del state_dict["classifier.bias"]
    expected = "classifier.extra" if change == "extra" else "classifier.bias"
    with pytest.raises(ConfigError, match=rf"differs from the model's own tensors: {re.escape(expected)}\."):
        qmodel.save_pretrained(tmp_path, state_dict=state_dict)
    assert not (tmp_path / "model.safetensors").exists()


def test_saving_a_model_whose_quantizer_lost_the_plan_is_refused(vit_w4a4, tmp_path):
    qmodel, _ = vit_w4a4
    plan, qmodel.hf_quantizer.plan = qmodel.hf_quantizer.plan, None
    try:
        with pytest.raises(optimum_dfq.DFQError, match="does not know the model's quantization plan"):
            qmodel.save_pretrained(tmp_path)
    finally:
        qmodel.hf_quantizer.plan = plan
    assert not (tmp_path / "model.safetensors").exists()


def test_calibration_metadata_json_cannot_hold_is_recorded_as_json_and_saves(tmp_path):
    # a user's CalibrationSet may carry a Path or a tuple in its metadata: the provenance is made plain JSON when the
    # model is quantized, so save_pretrained can write it and the loaded model reads back the same provenance
    from optimum_dfq import CalibrationSet, DataFreeViTQuantizer

    metadata = {"source": "synthetic", "synthesizer": "mine", "seed": 1,
                "hyperparameters": {"folder": Path("/data/run"), "sizes": (1, 2)}}
    calibration = CalibrationSet(pixel_values=torch.randn(4, 3, 32, 32), metadata=metadata)
    qmodel = DataFreeViTQuantizer().quantize(tiny_vit(), bits="w8a8", calibration_dataset=calibration)
    recorded = qmodel.hf_quantizer.provenance["calibration"]
    assert recorded["hyperparameters"] == {"folder": str(Path("/data/run")), "sizes": [1, 2]}
    qmodel.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert loaded.hf_quantizer.provenance == qmodel.hf_quantizer.provenance


@pytest.mark.parametrize("format", ["optimum_dfq", "compressed-tensors"])
def test_save_pretrained_to_a_file_is_refused_instead_of_saving_nothing(format, vit_w4a4, tmp_path):
    # transformers only logs "Provided path (...) should be a directory, not a file" and returns: the quantized model
    # (minutes of synthesis) was not saved, and the call looked like it succeeded
    qmodel, _ = vit_w4a4
    target = tmp_path / "model"
    target.write_text("")
    with pytest.raises(ConfigError, match=r"model is a file, so nothing would be saved.*pass a folder"):
        qmodel.save_pretrained(target, format=format)


def test_half_and_float_cast_like_to_and_like_loading_in_that_dtype(vit_w4a4, pixels):
    # transformers refuses .half()/.float() on every quantized model ("already casted to the correct dtype"), while
    # .to(torch.float16) and from_pretrained(dtype=torch.float16) give this model in float16
    _, folder = vit_w4a4
    loaded_in_half = AutoModelForImageClassification.from_pretrained(folder, dtype=torch.float16)
    model = AutoModelForImageClassification.from_pretrained(folder)
    assert model.half() is model and model.dtype == torch.float16
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels[0].half()).logits,
                           loaded_in_half(pixel_values=pixels[0].half()).logits)
    assert loaded_in_half.float() is loaded_in_half and loaded_in_half.dtype == torch.float32
    assert torch.equal(logits(loaded_in_half, pixels[0]), logits(model.to(torch.float32), pixels[0]))


def test_image_classification_pipeline_runs_the_quantized_checkpoint(vit_w4a4, image_processor, tmp_path):
    """`pipeline("image-classification", model=folder)` (after `import optimum_dfq`) loads the quantized checkpoint
    with its image processor and scores like the quantized model on the processor's pixels."""
    from datasets import load_dataset
    from transformers import pipeline

    from ..conftest import FIXTURES

    qmodel, saved = vit_w4a4
    folder = shutil.copytree(saved, tmp_path / "with-processor")
    image_processor.save_pretrained(folder)
    image = load_dataset("parquet", data_files=str(FIXTURES / "cifar10_tiny_test.parquet"), split="train")[0]["img"]
    classify = pipeline("image-classification", model=str(folder))
    assert getattr(classify.model, "is_quantized", False)
    predictions = classify(image, top_k=3)
    with torch.no_grad():
        probabilities = qmodel(**image_processor(image, return_tensors="pt")).logits.softmax(-1)[0]
    top = probabilities.topk(3)
    assert [p["label"] for p in predictions] == [qmodel.config.id2label[int(i)] for i in top.indices]
    assert [p["score"] for p in predictions] == pytest.approx(top.values.tolist(), abs=1e-6)
