"""Pushing to the Hub offline: only HfApi's HTTP methods are faked; pulling back goes through a hand-built cache."""

from __future__ import annotations

import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RevisionNotFoundError
from transformers import AutoImageProcessor, AutoModelForImageClassification

from optimum_dfq import ConfigError, DataFreeViTQuantizer, DFQConfig
from optimum_dfq.hub import accuracy_eval_results, build_model_card, write_repo_extras

from ..conftest import FIXTURES, tiny_vit
from .conftest import logits, quantize

SHA = "a" * 40
USER = "fake-user"  # the namespace of the token's user


def read_card(repo: Path) -> ModelCard:
    return ModelCard((repo / "README.md").read_text())  # ModelCard.load is faked while pushing


class FakeHub:
    """A local folder per repository, filled by the faked upload calls."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.created: list[dict] = []
        self.commits: list[dict] = []
        self.branches: dict[str, set[str]] = {}
        self.may_create_branches = True

    def repo(self, repo_id: str) -> Path:
        return self.root / repo_id

    # HfApi.create_repo / HfApi.upload_folder (optimum_dfq.hub.push_to_hub)
    def create_repo(self, api, repo_id, **kwargs):
        repo_id = repo_id if "/" in repo_id else f"{USER}/{repo_id}"  # as the Hub does with a bare name
        self.repo(repo_id).mkdir(parents=True, exist_ok=True)
        self.branches.setdefault(repo_id, {"main"})
        self.created.append({"repo_id": repo_id, "token": getattr(api, "token", None), **kwargs})
        return mock.Mock(repo_id=repo_id)

    def create_branch(self, api, repo_id, *, branch, exist_ok=False, **kwargs):
        if not self.may_create_branches:
            raise HfHubHTTPError("403 Forbidden: no write access", response=mock.Mock(status_code=403, headers={}))
        if branch in self.branches[repo_id] and not exist_ok:
            raise HfHubHTTPError("409 Conflict: branch exists", response=mock.Mock(status_code=409, headers={}))
        self.branches[repo_id].add(branch)

    def upload_folder(self, api, *, repo_id, folder_path, commit_message=None, **kwargs):
        revision = kwargs.get("revision")
        if revision is not None and not revision.startswith("refs/pr/") and revision not in self.branches[repo_id]:
            raise RevisionNotFoundError(f"404: no revision {revision!r}",
                                        response=mock.Mock(status_code=404, headers={}))
        shutil.copytree(folder_path, self.repo(repo_id), dirs_exist_ok=True)
        self.commits.append({"repo_id": repo_id, "message": commit_message, "library": api.library_name,
                             "options": kwargs})
        return mock.Mock(oid=SHA)

    # transformers.utils.hub.hf_api() (model.push_to_hub): create_repo + create_commit
    def transformers_api(self):
        hub = self

        class Api:
            def create_repo(self, repo_id, **kwargs):
                return hub.create_repo(None, repo_id)

            def create_branch(self, repo_id, branch, **kwargs):
                return hub.create_branch(None, repo_id, branch=branch, **kwargs)

            def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
                for operation in operations:
                    target = hub.repo(repo_id) / operation.path_in_repo
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(operation.path_or_fileobj, target)
                hub.commits.append({"repo_id": repo_id, "message": commit_message,
                                    "files": sorted(op.path_in_repo for op in operations)})
                return mock.Mock(commit_url="fake://commit")

        return Api()

    def install_in_cache(self, repo_id: str, cache: Path) -> None:
        """Lays the repository out as huggingface_hub would have downloaded it at `main`."""
        root = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(self.repo(repo_id), root / "snapshots" / SHA, dirs_exist_ok=True)
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(SHA)


@pytest.fixture
def hub(tmp_path):
    fake = FakeHub(tmp_path / "hub")
    with mock.patch.object(HfApi, "create_repo", lambda api, repo_id, **kw: fake.create_repo(api, repo_id, **kw)), \
            mock.patch.object(HfApi, "upload_folder", lambda api, **kw: fake.upload_folder(api, **kw)), \
            mock.patch.object(HfApi, "create_branch", lambda api, repo, **kw: fake.create_branch(api, repo, **kw)), \
            mock.patch("transformers.utils.hub.hf_api", fake.transformers_api), \
            mock.patch("transformers.utils.hub.ModelCard.load", side_effect=EntryNotFoundError("no remote card")):
        yield fake


def test_quantizer_push_uploads_model_processor_and_card_then_loads_by_repo_id(vit_w4a4, image_processor, hub,
                                                                               tmp_path, pixels):
    qmodel, _ = vit_w4a4
    quantizer = DataFreeViTQuantizer(image_processor=image_processor)
    results = accuracy_eval_results({"top1": 0.5, "top5": 0.875, "num_examples": 256}, dataset_id="cifar10",
                                    dataset_name="CIFAR-10", split="test")
    quantizer.push_to_hub(qmodel, "dfq-org/vit-tiny-w4a4", eval_results=results,
                          base_model="google/vit-base-patch16-224")

    repo = hub.repo("dfq-org/vit-tiny-w4a4")
    assert sorted(p.name for p in repo.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    assert hub.commits[-1]["library"] == "optimum-dfq"
    card = read_card(repo)
    assert "import optimum_dfq" in card.text
    assert 'from_pretrained("dfq-org/vit-tiny-w4a4")' in card.text
    assert "8 synthetic images from the `gaussian` synthesizer" in card.text and "No real image was used" in card.text
    assert "bits: w4a4" in card.text  # the recipe
    assert "image input | 8-bit, levels on the pixel grid of the image processor" in card.text  # vit_w4a4 has one
    assert card.data.base_model == "google/vit-base-patch16-224" and card.data.base_model_relation == "quantized"
    assert {"optimum-dfq", "data-free", "w4a4"} <= set(card.data.tags)
    assert [(r.metric_name, r.metric_value, r.dataset_type, r.dataset_name, r.dataset_split)
            for r in card.data.eval_results] == [("Top-1 accuracy", 0.5, "cifar10", "CIFAR-10", "test"),
                                                 ("Top-5 accuracy", 0.875, "cifar10", "CIFAR-10", "test")]
    assert "| CIFAR-10 | test | Top-1 accuracy | 0.5 |" in card.text
    assert "model-index" in card.content

    cache = tmp_path / "cache"
    hub.install_in_cache("dfq-org/vit-tiny-w4a4", cache)
    loaded = AutoModelForImageClassification.from_pretrained("dfq-org/vit-tiny-w4a4", cache_dir=cache)
    assert AutoImageProcessor.from_pretrained("dfq-org/vit-tiny-w4a4", cache_dir=cache).size == image_processor.size
    assert loaded.name_or_path == "dfq-org/vit-tiny-w4a4"
    assert torch.equal(logits(loaded, pixels[0]), logits(qmodel, pixels[0]))


def test_transformers_push_to_hub_uploads_our_card_not_the_generic_one(vit_w4a4, hub, tmp_path, pixels):
    qmodel, _ = vit_w4a4
    qmodel.push_to_hub("dfq-org/vit-tiny-w4a4-tf", tags=["extra-tag"])

    commit = hub.commits[-1]
    assert commit["files"] == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    card = read_card(hub.repo("dfq-org/vit-tiny-w4a4-tf"))
    assert "import optimum_dfq" in card.text and "automatically generated" not in card.text
    assert "optimum-dfq" in card.data.tags

    # a model loaded back from the Hub pushes the same way, and keeps the provenance recorded in the checkpoint
    cache = tmp_path / "cache"
    hub.install_in_cache("dfq-org/vit-tiny-w4a4-tf", cache)
    loaded = AutoModelForImageClassification.from_pretrained("dfq-org/vit-tiny-w4a4-tf", cache_dir=cache)
    assert torch.equal(logits(loaded, pixels[0]), logits(qmodel, pixels[0]))
    loaded.push_to_hub("dfq-org/vit-tiny-w4a4-again")
    again = read_card(hub.repo("dfq-org/vit-tiny-w4a4-again"))
    assert "8 synthetic images from the `gaussian` synthesizer" in again.text


def test_card_of_real_data_calibration_does_not_claim_data_free(cifar_train, image_processor):
    qmodel = DataFreeViTQuantizer(tiny_vit(), image_processor).quantize(
        bits="w8a8", calibration_dataset=cifar_train, num_images=8)
    card = build_model_card(qmodel, "org/real")
    assert "data-free" not in card.data.tags
    assert "**real images**: 8 from a user-provided dataset" in card.text
    assert "No real image was used" not in card.text
    assert "activations `minmax` (after an activation function `percentile_mse`)" in card.text  # 8-bit ranges
    assert "so this recipe's `synthesizer`, `synthesizer_kwargs`, `calibration_dataset` and `seed` did not make" \
        in card.text


def test_card_of_a_recipe_with_a_calibration_dataset_names_it_also_without_a_calibration_record(image_processor):
    path = str(FIXTURES / "cifar10_tiny_train.parquet")
    qmodel = DataFreeViTQuantizer(tiny_vit(), image_processor).quantize(
        config=DFQConfig(bits="w8a8", num_images=8, calibration_dataset={"path": path}))
    card = build_model_card(qmodel, "org/real-recipe")
    assert f"**real images**: 8 from {path} (seed 0); not data-free" in card.text
    assert "did not make them" not in card.text  # the recipe's calibration_dataset made the set
    # a model whose provenance has no calibration record (written before it was recorded): the config tells
    qmodel.hf_quantizer.provenance = {**qmodel.hf_quantizer.provenance, "calibration": {}}
    card = build_model_card(qmodel, "org/real-recipe")
    assert f"**real images**: 8 from {path}" in card.text and "data-free" not in card.data.tags


def test_card_table_lists_the_quantizers_the_config_has(vit_w4a4):
    rows = build_model_card(vit_w4a4[0], "org/w4a4").text
    assert "| image input | 8-bit, levels on the pixel grid of the image processor, per channel |" in rows
    assert "| attention | Q, K, V 4-bit uniform; softmax output `log_sqrt2` |" in rows
    calibrated = build_model_card(quantize(tiny_vit, "w4a4"), "org/no-processor").text  # no processor: calibrated
    assert "| image input | 8-bit, one calibrated range |" in calibrated
    weight_only = build_model_card(quantize(tiny_vit, "w4a16"), "org/w4a16").text
    assert "| activations | float (weight-only quantization) |" in weight_only
    assert "| image input |" not in weight_only and "| attention |" not in weight_only


def test_recipe_is_not_annotated_when_it_made_the_calibration_set(vit_w4a4):
    qmodel, _ = vit_w4a4
    assert "did not make them" not in build_model_card(qmodel, "org/synthetic").text


@pytest.mark.parametrize("recipe_synthesizer", [None, "gaussian"])  # another synthesizer, or only another seed
def test_recipe_note_for_a_saved_synthetic_set_of_another_seed(recipe_synthesizer, image_processor):
    from optimum_dfq.synthesis import calibration_set_to_dataset, get_synthesizer

    saved = get_synthesizer("gaussian").synthesize(tiny_vit(), 4, seed=3)
    config = DFQConfig(bits="w8a8", **({"synthesizer": recipe_synthesizer} if recipe_synthesizer else {}))
    assert (config.synthesizer == "gaussian") == bool(recipe_synthesizer) and config.seed == 0
    qmodel = DataFreeViTQuantizer(tiny_vit(), image_processor).quantize(
        config=config, calibration_dataset=calibration_set_to_dataset(saved))
    text = build_model_card(qmodel, "org/saved").text
    assert "`gaussian` synthesizer" in text and "seed 3" in text
    assert "did not make them" in text


def test_local_base_model_is_never_declared_as_a_hub_model(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    tiny_vit().save_pretrained("models/vit-float")  # a relative path that looks like "org/name"
    qmodel = DataFreeViTQuantizer.from_pretrained("models/vit-float").quantize(bits="w4a4", synthesizer="gaussian",
                                                                                 num_images=8)
    qmodel.save_pretrained(tmp_path / "saved")
    monkeypatch.chdir(tmp_path)  # the card is built elsewhere, where "models/vit-float" does not exist
    for model in (qmodel, AutoModelForImageClassification.from_pretrained(tmp_path / "saved")):
        card = build_model_card(model, "org/x")
        assert card.data.base_model is None and "base_model_relation" not in card.content
        assert "huggingface.co/models" not in card.text and "of a `ViTForImageClassification`" in card.text


def test_card_promises_an_image_processor_only_when_the_upload_has_one(hub, tmp_path):
    qmodel = quantize(tiny_vit, "w4a4")  # no image processor
    DataFreeViTQuantizer().push_to_hub(qmodel, "org/no-processor")
    repo = hub.repo("org/no-processor")
    assert not (repo / "preprocessor_config.json").exists()
    text = read_card(repo).text
    assert "AutoImageProcessor" not in text and "has no image processor config" in text


def test_loaded_model_pushes_the_processor_config_found_next_to_its_checkpoint(vit_w4a4, hub, tmp_path):
    _, folder = vit_w4a4
    local = shutil.copytree(folder, tmp_path / "local")
    (local / "preprocessor_config.json").write_text('{"image_processor_type": "ViTImageProcessor", "size": '
                                                    '{"height": 32, "width": 32}}')
    AutoModelForImageClassification.from_pretrained(local).push_to_hub("org/repush")
    assert "preprocessor_config.json" in hub.commits[-1]["files"]
    assert (hub.repo("org/repush") / "preprocessor_config.json").read_text() == (
        local / "preprocessor_config.json").read_text()
    assert 'AutoImageProcessor.from_pretrained("org/repush")' in read_card(hub.repo("org/repush")).text


def test_loaded_model_without_a_processor_config_next_to_it_pushes_none_and_says_so(vit_w4a4, hub):
    _, folder = vit_w4a4
    assert not (folder / "preprocessor_config.json").exists()
    AutoModelForImageClassification.from_pretrained(folder).push_to_hub("org/no-processor-here")
    assert "preprocessor_config.json" not in hub.commits[-1]["files"]
    text = read_card(hub.repo("org/no-processor-here")).text
    assert "AutoImageProcessor" not in text and "has no image processor config" in text


def test_push_forwards_the_upload_options_and_uses_the_repo_id_the_hub_gives_back(vit_w4a4, hub):
    qmodel, _ = vit_w4a4
    DataFreeViTQuantizer().push_to_hub(qmodel, "vit-tiny", private=True, token="hf_fake", revision="dev",
                                       create_pr=True, commit_message="First upload", commit_description="Details",
                                       max_shard_size="20KB")
    assert hub.created[-1] == {"repo_id": f"{USER}/vit-tiny", "token": "hf_fake", "private": True, "exist_ok": True}
    commit = hub.commits[-1]
    assert (commit["repo_id"], commit["message"]) == (f"{USER}/vit-tiny", "First upload")
    assert commit["options"] == {"commit_description": "Details", "revision": "dev", "create_pr": True}
    repo = hub.repo(f"{USER}/vit-tiny")
    assert (repo / "model.safetensors.index.json").is_file()  # max_shard_size reached save_pretrained
    # the id the model can be loaded by, at the branch the pull request targets
    assert f'from_pretrained("{USER}/vit-tiny", revision="dev")' in read_card(repo).text


def test_push_to_a_new_branch_creates_it_first(vit_w4a4, hub):
    qmodel, _ = vit_w4a4
    DataFreeViTQuantizer().push_to_hub(qmodel, "org/branches", revision="w4a4")
    assert hub.branches["org/branches"] == {"main", "w4a4"}
    assert hub.commits[-1]["options"]["revision"] == "w4a4"
    text = read_card(hub.repo("org/branches")).text  # the loading snippet names the branch
    assert 'AutoModelForImageClassification.from_pretrained("org/branches", revision="w4a4")' in text
    assert 'AutoImageProcessor.from_pretrained("org/branches", revision="w4a4")' in text
    DataFreeViTQuantizer().push_to_hub(qmodel, "org/branches", revision="w4a4")  # an existing branch is reused
    assert len(hub.commits) == 2


@pytest.mark.parametrize("revision", ["dev", "main", None])
def test_transformers_push_to_a_branch_names_it_in_the_card(revision, vit_w4a4, hub):
    qmodel, _ = vit_w4a4
    qmodel.push_to_hub("org/tf-branches", revision=revision)
    assert hub.branches["org/tf-branches"] == {"main", revision or "main"}
    at = '"org/tf-branches"' + (', revision="dev"' if revision == "dev" else "")
    assert f"AutoModelForImageClassification.from_pretrained({at})\n" in read_card(hub.repo("org/tf-branches")).text


def test_a_pull_request_revision_creates_no_branch(vit_w4a4, hub):
    qmodel, _ = vit_w4a4
    hub.may_create_branches = False
    DataFreeViTQuantizer().push_to_hub(qmodel, "org/pr", revision="refs/pr/3")
    assert hub.branches["org/pr"] == {"main"} and hub.commits[-1]["options"]["revision"] == "refs/pr/3"
    assert 'from_pretrained("org/pr")' in read_card(hub.repo("org/pr")).text  # lands on main when merged


def test_without_write_access_only_a_pull_request_may_target_an_existing_branch(vit_w4a4, hub):
    qmodel, _ = vit_w4a4
    hub.may_create_branches = False
    DataFreeViTQuantizer().push_to_hub(qmodel, "org/theirs", revision="main", create_pr=True)
    assert hub.commits[-1]["options"] == {"commit_description": None, "revision": "main", "create_pr": True}
    with pytest.raises(HfHubHTTPError, match="403 Forbidden"):
        DataFreeViTQuantizer().push_to_hub(qmodel, "org/theirs", revision="main")
    assert len(hub.commits) == 1


def test_repo_extras_keep_a_processor_config_already_in_the_folder(vit_w4a4, tmp_path):
    qmodel, _ = vit_w4a4  # has an image processor attached
    own = '{"image_processor_type": "ViTImageProcessor", "size": {"height": 48, "width": 48}}'
    (tmp_path / "preprocessor_config.json").write_text(own)
    write_repo_extras(qmodel, tmp_path, "org/own-processor")
    assert (tmp_path / "preprocessor_config.json").read_text() == own
    assert 'AutoImageProcessor.from_pretrained("org/own-processor")' in (tmp_path / "README.md").read_text()


def test_card_intro_says_where_synthetic_images_came_from(vit_w4a4):
    qmodel = vit_w4a4[0]
    noise = build_model_card(qmodel, "org/noise").text
    assert "the calibration images are Gaussian noise" in noise and "from the float model itself" not in noise
    saved = qmodel.hf_quantizer.provenance
    try:
        for synthesizer, expected in (("dfq-vit", "the calibration images were synthesized from the float model"),
                                      ("unregistered-here", "generated by the `unregistered-here` synthesizer")):
            qmodel.hf_quantizer.provenance = {**saved, "calibration": {"source": "synthetic",
                                                                       "synthesizer": synthesizer}}
            assert expected in build_model_card(qmodel, f"org/{synthesizer}").text
    finally:
        qmodel.hf_quantizer.provenance = saved


def test_commit_message_says_data_free_only_for_synthetic_calibration(vit_w4a4, cifar_train, image_processor, hub):
    DataFreeViTQuantizer().push_to_hub(vit_w4a4[0], "org/synthetic")
    assert hub.commits[-1]["message"] == "Upload w4a4 data-free quantized model"
    real = DataFreeViTQuantizer(tiny_vit(), image_processor).quantize(bits="w8a8", calibration_dataset=cifar_train,
                                                                     num_images=8)
    DataFreeViTQuantizer().push_to_hub(real, "org/real")
    assert hub.commits[-1]["message"] == "Upload w8a8 quantized model"


def test_pushing_a_float_model_is_refused_before_a_repository_is_created(hub):
    with pytest.raises(ConfigError, match="not an optimum_dfq quantized model"):
        DataFreeViTQuantizer().push_to_hub(tiny_vit(), "org/float")
    assert hub.created == [] and hub.commits == []


def test_eval_results_attached_to_the_quantizer_reach_the_card_of_transformers_push(vit_w4a4, hub):
    qmodel, _ = vit_w4a4
    qmodel.hf_quantizer.eval_results = accuracy_eval_results({"top1": 0.625}, dataset_id="cifar10")
    try:
        qmodel.push_to_hub("org/with-results")  # transformers' push_to_hub takes no eval_results
    finally:
        qmodel.hf_quantizer.eval_results = None
    card = read_card(hub.repo("org/with-results"))
    assert [(r.metric_name, r.metric_value) for r in card.data.eval_results] == [("Top-1 accuracy", 0.625)]
    assert "| cifar10 | validation | Top-1 accuracy | 0.625 |" in card.text


def test_card_errors():
    with pytest.raises(ConfigError, match="not an optimum_dfq quantized model"):
        build_model_card(tiny_vit(), "org/float")
    with pytest.raises(ConfigError, match="No 'top1'/'top5' accuracy"):
        accuracy_eval_results({"loss": 1.0}, dataset_id="cifar10")


def test_hub_id_the_float_model_was_loaded_from_is_the_card_s_base_model_also_after_saving(tmp_path):
    model = tiny_vit()
    model.name_or_path = "google/vit-base-patch16-224"  # what from_pretrained("google/...") sets
    qmodel = DataFreeViTQuantizer(model).quantize(bits="w4a4", synthesizer="gaussian", num_images=4)
    qmodel.save_pretrained(tmp_path)
    for loaded in (qmodel, AutoModelForImageClassification.from_pretrained(tmp_path)):
        card = build_model_card(loaded, "org/x")
        assert card.data.base_model == "google/vit-base-patch16-224"
        assert card.data.base_model_relation == "quantized"
        assert "https://huggingface.co/google/vit-base-patch16-224" in card.text
        # no image processor: the card points to the base model's
        assert ("preprocess images as for the float model ([`google/vit-base-patch16-224`]"
                "(https://huggingface.co/google/vit-base-patch16-224))") in card.text
