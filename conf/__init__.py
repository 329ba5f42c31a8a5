"""The Hydra configs: train.yaml, submit.yaml, evaluate.yaml, demo.yaml and their groups.

They live at the top of the repository, where a user edits them, and the wheel carries them inside
the package as ``coco_multilabel.conf`` (pyproject.toml maps this folder there); this file makes the
folder that package, so that an editable install finds it as well. coco_multilabel/cli.py has
``CONFIG_DIR``.
"""
