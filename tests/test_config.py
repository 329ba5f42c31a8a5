from coco_multilabel.config import run_dir_for


def test_a_resumed_run_continues_in_its_own_folder():
    assert run_dir_for(None, "outputs/train/new") == "outputs/train/new"
    assert run_dir_for("outputs/train/a/checkpoints/last.ckpt", "outputs/train/new") == "outputs/train/a"
    assert run_dir_for("elsewhere/model.ckpt", "outputs/train/new") == "elsewhere"
