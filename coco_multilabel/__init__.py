"""coco-multilabel: multi-label classification for the MS COCO classification challenge.

What a user runs, each ``python -m coco_multilabel.<name>`` (or the ``make`` target, or ``coco-<name>``):

- ``train``       fit a model (Hydra: ``conf/train.yaml``); ``-m`` runs a sweep
- ``search``      an Optuna study over the train config (``conf/search/``), resumable, one trial per GPU
- ``submit``      write the leaderboard's JSON from a checkpoint
- ``evaluate``    score a JSON or saved probabilities against label files
- ``predict``     the classes a checkpoint sees in your own images
- ``report``      an HTML report of a run or a sweep
- ``check_data``  what is wrong with a data root, before training on it
- ``unpack``      unpack the challenge's ms-coco.zip into a data root
- ``demo``        the whole workflow on synthetic data, offline

Everything else lives in a room named for its concept: ``data/``, ``models/``, ``decisions/``
(thresholds, the submission format, the probabilities file), ``callbacks/``, ``sweeps/``,
``reporting/`` and ``bench/``.
"""
