"""The reference-model trainer's resume logic: saved hyperparameters win unless an option is given explicitly."""

import importlib.util
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trainer():
    path = ROOT / "examples" / "train_reference_model.py"
    spec = importlib.util.spec_from_file_location("train_reference_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


def _resume(trainer, argv, saved_overrides):
    parser = trainer.build_parser()
    saved = vars(parser.parse_args(["--output-dir", "x"]))
    saved.update(saved_overrides)
    return trainer.merge_resumed_args(parser.parse_args(argv), saved, trainer.explicit_options(argv))


def test_resume_takes_saved_hyperparameters(trainer):
    merged = _resume(trainer, ["--output-dir", "x", "--resume"], {"epochs": 12, "lr": 5e-4})
    assert (merged.epochs, merged.lr) == (12, 5e-4)


def test_explicit_epochs_extend_the_run_even_when_equal_to_the_default(trainer):
    default_epochs = trainer.build_parser().parse_args(["--output-dir", "x"]).epochs
    merged = _resume(trainer, ["--output-dir", "x", "--resume", "--epochs", str(default_epochs)], {"epochs": 12})
    assert merged.epochs == default_epochs


def test_explicit_contradiction_is_an_error(trainer):
    with pytest.raises(ValueError, match="--lr=0.01 contradicts the checkpoint"):
        _resume(trainer, ["--output-dir", "x", "--resume", "--lr", "0.01"], {"lr": 5e-4})


def test_model_card_history_lists_each_schedule_extension(trainer, tmp_path):
    log = tmp_path / "train_log.jsonl"
    lrs = [1e-3, 5e-4, 1e-4, 1e-5, 2e-4, 5e-5, 1e-5]  # one extension: the rise after epoch 4
    rows = (f'{{"epoch": {i + 1}, "lr": {lr}, "test_accuracy": 0.{50 + i}}}\n' for i, lr in enumerate(lrs))
    log.write_text("".join(rows))
    history = trainer.schedule_history(log)
    assert history.count("- from epoch") == 1
    assert "from epoch 5: lr 1e-05 at the end of epoch 4, 0.0002 at the end of epoch 5" in history
    assert "53.00%" in history
    log.write_text("".join(f'{{"epoch": {i + 1}, "lr": {lr}, "test_accuracy": 0.5}}\n' for i, lr in enumerate(lrs[:4])))
    assert trainer.schedule_history(log) == ""  # a run that was never extended has no history section


@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--eval-batch-size", "0"), ("--save-steps", "0"),
                                           ("--epochs", "0"), ("--lr", "0"), ("--threads", "0"),
                                           ("--max-steps", "0"), ("--max-minutes", "0")])
def test_bad_numbers_are_refused_before_the_data_is_loaded(trainer, tmp_path, capsys, option, value):
    # they failed with a ZeroDivisionError / range() error (--eval-batch-size: after a whole epoch), or did nothing
    # (--epochs 0), or nothing they said (--max-minutes 0 set no limit, --max-steps 0 ran a step)
    with pytest.raises(SystemExit) as exit_info:
        trainer.main(["--output-dir", str(tmp_path / "run"), "--dataset", str(tmp_path / "no-data"), option, value])
    assert exit_info.value.code == 2
    assert f"{option} {value}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _tiny_dataset(folder: Path) -> Path:
    folder.mkdir()
    for split in ("train", "test"):  # 64 and 256 CIFAR-10 images
        shutil.copy(ROOT / "tests" / "fixtures" / f"cifar10_tiny_{split}.parquet", folder / f"{split}.parquet")
    return folder


def test_a_batch_larger_than_the_train_split_is_refused(trainer, tmp_path):
    data = _tiny_dataset(tmp_path / "data")
    with pytest.raises(ValueError, match=r"--batch-size 128 is larger than the train split \(64 images\)"):
        trainer.main(["--output-dir", str(tmp_path / "run"), "--dataset", str(data), "--hidden-size", "16",
                      "--num-layers", "1", "--num-heads", "2"])


def test_an_existing_checkpoint_is_refused_before_the_data_is_loaded(trainer, tmp_path):
    # it was refused only after the whole dataset was decoded (about a minute for CIFAR-10)
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint" / "trainer_state.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already holds a checkpoint: pass --resume or use another --output-dir"):
        trainer.main(["--output-dir", str(tmp_path / "run"), "--dataset", str(tmp_path / "no-data")])


def test_resume_with_fewer_epochs_than_already_trained_is_refused(trainer, tmp_path):
    # it printed "the cosine schedule is stretched", trained nothing and reported "[done] 4 epochs" for 5
    saved = vars(trainer.finalize_args(trainer.build_parser().parse_args(["--output-dir", "x", "--epochs", "6"])))
    saved["dataset"] = str(tmp_path / "no-data")
    checkpoint = tmp_path / "run" / "checkpoint"
    checkpoint.mkdir(parents=True)
    state = {"format_version": 1, "args": {key: saved[key] for key in trainer.HYPERPARAMETERS},
             "train_state": {"epoch": 5, "step_in_epoch": 0, "global_step": 20}}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="--epochs 4: the checkpoint has already trained 5 epochs; pass --epochs 6"):
        trainer.main(["--output-dir", str(tmp_path / "run"), "--resume", "--epochs", "4"])


@pytest.mark.parametrize(("scheduled", "step_in_epoch", "least"), [(6, 0, 6), (5, 3, 6)])
def test_resume_with_as_many_epochs_as_an_unfinished_run_has_trained_is_refused(trainer, tmp_path, scheduled,
                                                                                 step_in_epoch, least):
    # --epochs 5 on a run of 6 stopped after epoch 5 (or in epoch 6) trained nothing, reported "[done] 5 epochs" and
    # left the last exported model card "in progress"
    saved = vars(trainer.finalize_args(trainer.build_parser().parse_args(["--output-dir", "x", "--epochs",
                                                                         str(scheduled)])))
    saved["dataset"] = str(tmp_path / "no-data")
    checkpoint = tmp_path / "run" / "checkpoint"
    checkpoint.mkdir(parents=True)
    state = {"format_version": 1, "args": {key: saved[key] for key in trainer.HYPERPARAMETERS},
             "train_state": {"epoch": 5, "step_in_epoch": step_in_epoch, "global_step": 20}}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=f"--epochs 5: the checkpoint has already trained 5 epochs; pass --epochs "
                                         f"{least} or more"):
        trainer.main(["--output-dir", str(tmp_path / "run"), "--resume", "--epochs", "5"])


def test_model_card_states_the_trained_image_size(trainer, tmp_path):
    # the card said "random crop 32x32" whatever --image-size
    data = _tiny_dataset(tmp_path / "data")
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:  # the trainer catches SIGINT/SIGTERM to checkpoint: give them back to pytest afterwards
        trainer.main(["--output-dir", str(tmp_path / "run"), "--dataset", str(data), "--image-size", "16",
                      "--patch-size", "8", "--hidden-size", "16", "--num-layers", "1", "--num-heads", "2",
                      "--epochs", "1", "--batch-size", "32"])
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    card = (tmp_path / "run" / "README.md").read_text()
    assert "random crop 16x16 with 4-px zero padding" in card and "32x32" not in card
    # trained on the folder "data", not on CIFAR-10 (whose channel statistics its image processor still uses)
    assert "datasets:\n- data\n" in card and "name: data\n" in card and "| data test |" in card
    assert "trained **from scratch** on data (train split only)" in card and "CIFAR-10 test" not in card


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="a notice of torchvision missing")
def test_saved_image_processor_is_built_without_the_missing_torchvision_notice(tmp_path):
    code = ("import sys; sys.path.insert(0, 'examples'); import train_reference_model as t; "
            f"t.build_image_processor(32).save_pretrained({str(tmp_path)!r})")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "requires torchvision" not in result.stderr
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "ViTImageProcessor"  # what AutoImageProcessor loads the models with
