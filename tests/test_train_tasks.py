"""``fastmeta train`` / ``evaluate`` on the RGB image tasks (tiny generated trees, tiny models), and
``--first-order`` honoured or refused for every ``--algo`` (issue #17)."""
import pytest
import torch

from fastmeta.algorithms.registry import FACTORIES, build_algorithm
from fastmeta.cli import main
from fastmeta.training import DEFAULTS, load_checkpoint, train
from test_image_data import cifar_tree, imagenet_tree

SMALL = ["--ways", "2", "--shots", "1", "--queries", "1", "--meta-batch", "2", "--inner-steps", "1", "--steps", "2",
         "--val-every", "2", "--val-tasks", "2", "--test-tasks", "2", "--image-size", "16", "--strategy", "loop",
         "--no-progress"]


def _tree(task, root, per_class=None):
    if task in ("miniimagenet", "tieredimagenet"):
        imagenet_tree(root, "csv" if task == "miniimagenet" else "folders", per_class=per_class or 4, size=16)
    else:
        cifar_tree(root, per_class=per_class or 6)
    return root


@pytest.mark.parametrize("task,model,width", [("miniimagenet", "conv4", ["2"]), ("tieredimagenet", "conv4", ["2"]),
                                              ("cifar-fs", "conv4", ["2"]), ("fc100", "resnet12", ["2", "3", "4", "5"])])
def test_train_then_evaluate_each_image_task(tmp_path, capsys, task, model, width):
    root = _tree(task, tmp_path / "data")
    ckpt = tmp_path / "run.pt"
    args = ["train", "--task", task, "--data-root", str(root), "--model", model, "--model-width", *width,
            "--out", str(ckpt)]
    assert main([*args, *SMALL]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "meta-test on 2 tasks" in out and "accuracy" in out
    c = load_checkpoint(ckpt)
    assert c["step"] == 2 and c["model_config"]["kind"] == model and c["model_config"]["in_channels"] == 3
    assert c["config"]["task"] == task and c["split"]["test"] and c["data"]["sha256"]
    assert set(c["summary"]) >= {"test_accuracy", "test_accuracy_ci95"}
    assert main(["evaluate", "--ckpt", str(ckpt), "--tasks", "3"]) == 0, capsys.readouterr().err
    assert f"on {task}): meta-test" in capsys.readouterr().out
    # resuming to step 3 continues the same run (same data, same settings)
    more = [a if a != "2" or SMALL[i - 1] != "--steps" else "3" for i, a in enumerate(SMALL)]
    assert main([*args, *more, "--resume"]) == 0, capsys.readouterr().err
    assert load_checkpoint(ckpt)["step"] == 3
    capsys.readouterr()
    # other data (one more image per class) is refused by evaluate, in one line naming data_root
    other = _tree(task, tmp_path / "other", per_class=9 if task in ("cifar-fs", "fc100") else 5)
    assert main(["evaluate", "--ckpt", str(ckpt), "--data-root", str(other)]) == 2
    err = capsys.readouterr().err
    assert "data_root: the data differs" in err and len(err.strip().splitlines()) == 1


def test_image_task_defaults_follow_maml_mini_imagenet():
    for task in ("miniimagenet", "tieredimagenet", "cifar-fs", "fc100"):
        d = DEFAULTS[task]
        assert (d["ways"], d["shots"], d["queries"], d["inner_lr"], d["meta_lr"], d["meta_batch"], d["inner_steps"]) \
            == (5, 1, 15, 0.01, 1e-3, 4, 5)


@pytest.mark.parametrize("argv,message", [
    (["--task", "miniimagenet"], "data_root: --task miniimagenet needs one --data-root"),
    (["--task", "cifar-fs", "--data-root", "a", "b"], "data_root: --task cifar-fs needs one --data-root"),
    (["--task", "fc100", "--data-root", "a", "--model", "resnet12", "--model-width", "4"],
     "model_width: --model resnet12 takes 4 positive int width"),
    (["--task", "miniimagenet", "--data-root", "a", "--image-size", "8"], "image_size: expected an int >= 16"),
    (["--model", "resnet12"], "model: --task sinusoid always uses its MLP"),
])
def test_bad_image_task_settings_are_one_line_errors(tmp_path, capsys, argv, message):
    assert main(["train", *argv, "--steps", "1", "--out", str(tmp_path / "x.pt"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_wrong_layout_is_refused_before_training(tmp_path, capsys):
    imagenet_tree(tmp_path, "folders", size=16)
    assert main(["train", "--task", "cifar-fs", "--data-root", str(tmp_path), "--out", str(tmp_path / "x.pt"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "root: expected CIFAR-100 python layout" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------ --first-order (issue #17)
REFUSED = {"hfmaml"}  # every other algorithm honours --first-order


@pytest.mark.parametrize("algo", sorted(FACTORIES))
def test_first_order_is_honoured_or_refused(tmp_path, capsys, algo):
    argv = ["train", "--algo", algo, "--first-order", "--steps", "1", "--val-every", "0", "--test-tasks", "2",
            "--meta-batch", "2", "--strategy", "loop", "--out", str(tmp_path / "x.pt"), "--no-progress"]
    if algo not in REFUSED:
        assert build_algorithm(dict(algo=algo, inner_lr=0.1, inner_steps=1, first_order=True)).first_order is True
        assert main(argv) == 0, capsys.readouterr().err
        assert load_checkpoint(tmp_path / "x.pt")["config"]["first_order"] is True
    else:
        with pytest.raises(ValueError, match="first_order"):
            build_algorithm(dict(algo=algo, inner_lr=0.1, inner_steps=1, first_order=True))
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"first_order: --algo {algo} has no first-order variant" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "x.pt").exists()


def test_maml_first_order_trains_fomaml():
    # Was: --algo maml --first-order trained second-order MAML. Now it is FO-MAML, step for step.
    base = dict(DEFAULTS["sinusoid"], task="sinusoid", seed=0, steps=3, val_every=0, test_tasks=2, strategy="loop",
                progress=False, out=None)
    log = [].append
    fo = train(dict(base, algo="maml", first_order=True), log=log)["final_params"]
    fomaml = train(dict(base, algo="fomaml"), log=log)["final_params"]
    second = train(dict(base, algo="maml"), log=log)["final_params"]
    assert torch.equal(fo, fomaml)
    assert not torch.allclose(fo, second)
