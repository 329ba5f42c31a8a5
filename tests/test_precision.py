"""Precision and device hygiene: float32 probabilities under mixed precision, the GPU presets'
precision, TF32 on CUDA only, one eval precision for validation and submit, CUDA's random state
for this process's device only, and uint8 batches normalised where the model runs."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T

from coco_multilabel.callbacks import random_state
from coco_multilabel.cli import CONFIG_DIR
from coco_multilabel.data.transforms import eval_transform
from coco_multilabel.errors import UserError
from coco_multilabel.models import MultiLabelClassifier
from coco_multilabel.models.inference import predict_files
from coco_multilabel.training import precision
from coco_multilabel.training.schedule import Phase

BACKBONE = {"_target_": "coco_multilabel.models.backbones.efficientnet_lite", "name": "efficientnet_lite0",
            "weights": None}  # fmt: skip
OPTIMIZER = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}
QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def model(**kwargs) -> MultiLabelClassifier:
    torch.manual_seed(0)
    return MultiLabelClassifier(BACKBONE, OPTIMIZER, head="csra", **kwargs).eval()


def images(n=2, size=64) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )


def test_logits_are_float32_under_mixed_precision():
    net = model()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(images=images())
        features = net(features=net.trunk_features(images()))  # from the cache too
    assert logits.dtype == features.dtype == torch.float32


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # validation_step with no Trainer
def test_eval_precision_decides_validation_whatever_the_trainer_runs():
    """``32`` switches a mixed-precision trainer's autocast off in validation; ``bf16`` switches
    it on in a float32 one; validation and predict compute the same probabilities."""
    x = images()
    full = model()
    with torch.no_grad():
        reference = full.probabilities({"images": x})
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what a bf16-mixed trainer wraps validation in
            validated = full.validation_step({"images": x, "targets": torch.zeros(2, 80)}, 0)["probs"]
        assert torch.equal(validated, reference)
        half = model(eval_precision="bf16")
        validated = half.validation_step({"images": x, "targets": torch.zeros(2, 80)}, 0)["probs"]
        predicted = half.predict_step({"images": x}, 0)
    assert torch.equal(validated, predicted) and not torch.equal(validated, reference)
    assert (validated - reference).abs().max() < 0.05


def test_an_unknown_eval_precision_is_refused():
    with pytest.raises(UserError, match="model.eval_precision must be one of 32, bf16, 16"):
        model(eval_precision="fp8")


class AutocastRecorder:
    """What autocast the backbone's first convolution sees: on or off, and in which dtype."""

    def __init__(self, net):
        self.seen = set()
        conv = next(m for m in net.backbone.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_pre_hook(self.record)

    def record(self, module, args):
        enabled = torch.is_autocast_enabled("cpu")
        self.seen.add((enabled, torch.get_autocast_dtype("cpu") if enabled else None))


@pytest.mark.parametrize(
    ("trainer_precision", "eval_precision", "expected"),
    [("bf16-mixed", "32", (False, None)), ("32-true", "bf16", (True, torch.bfloat16))],
)
def test_submit_evaluates_at_the_precision_validation_tuned_at(
    tiny_root, trainer_precision, eval_precision, expected
):
    net = model(eval_precision=eval_precision)
    net.set_phase(Phase("probe", epochs=1, train="head"))
    recorder = AutocastRecorder(net)
    x = images(4, 48)
    val = DataLoader([{"images": x[i], "targets": torch.zeros(80)} for i in range(4)], batch_size=2)
    L.Trainer(accelerator="cpu", precision=trainer_precision, **QUIET).validate(net, val)
    validation = set(recorder.seen)
    recorder.seen.clear()
    paths = sorted((tiny_root / "images" / "test").glob("*.jpg"))[:2]
    checkpoint = {"datamodule_hyper_parameters": {"image_size": 48}}
    probs, _ = predict_files(net, checkpoint, paths, num_workers=0, accelerator="cpu", progress_bar=False)
    assert validation == recorder.seen == {expected}
    assert probs.dtype == torch.float32 and probs.device.type == "cpu"


def fake_gpus(monkeypatch, capabilities: list[tuple[int, int]]) -> None:
    """torch.cuda as a machine with these GPUs shows it (none: no GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(capabilities))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=0: capabilities[device])


def composed_precisions(tmp_path, *overrides) -> tuple[str, str]:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"run_dir={tmp_path}", "data.root=x", *overrides])
    return cfg.trainer.precision, str(cfg.model.eval_precision)


H100, A100, T4, V100 = (9, 0), (8, 0), (7, 5), (7, 0)


@pytest.mark.parametrize(
    ("gpus", "overrides", "expected"),
    [
        ([H100], [], ("bf16-mixed", "bf16")),
        ([A100], [], ("bf16-mixed", "bf16")),
        ([T4], [], ("16-mixed", "16")),
        ([], [], ("32-true", "32")),
        ([H100], ["trainer=gpu"], ("bf16-mixed", "bf16")),
        ([V100], ["trainer=gpu"], ("16-mixed", "16")),
        ([A100, A100], ["trainer=ddp"], ("bf16-mixed", "bf16")),
        ([A100, T4], [], ("16-mixed", "16")),  # the lowest counts: every job of a sweep runs it
        ([H100], ["trainer.accelerator=cpu"], ("32-true", "32")),
        ([H100], ["trainer=cpu"], ("32-true", "32")),
        ([H100], ["trainer=ddp", "trainer.accelerator=cpu"], ("32-true", "32")),
        ([], ["trainer=gpu"], ("32-true", "32")),
        ([H100], ["trainer.precision=32-true"], ("32-true", "32")),
        ([H100], ["trainer.precision=16-mixed"], ("16-mixed", "16")),
        ([H100], ["model.eval_precision=32"], ("bf16-mixed", "32")),
    ],
)
def test_the_default_precision_follows_the_device_and_evaluation_follows_training(
    monkeypatch, tmp_path, gpus, overrides, expected
):
    fake_gpus(monkeypatch, gpus)
    assert composed_precisions(tmp_path, *overrides) == expected


def test_every_rank_resolves_what_rank_0_resolves(monkeypatch, tmp_path):
    """Lightning's DDP starts each rank as a new process that composes the config again: with the
    same GPUs visible (the launcher passes its environment on) each resolves the same."""
    fake_gpus(monkeypatch, [A100, A100])
    rank0 = composed_precisions(tmp_path, "trainer=ddp")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert composed_precisions(tmp_path, "trainer=ddp") == rank0 == ("bf16-mixed", "bf16")


class FakeStrategy:
    """Two ranks' collectives, seen from one rank: rank 0 chose ``rank0``, the other ``others``."""

    def __init__(self, rank0: str, others: str):
        self.rank0, self.others = rank0, others

    def broadcast(self, value, src=0):
        return self.rank0

    def reduce_boolean_decision(self, decision, all=True):
        return decision and self.rank0 == self.others


@pytest.mark.parametrize(("rank", "mine"), [(0, "bf16-mixed"), (1, "16-mixed")])
def test_a_ddp_run_whose_ranks_disagree_on_precision_is_refused_on_every_rank(rank, mine):
    trainer = SimpleNamespace(
        world_size=2, global_rank=rank, precision=mine, strategy=FakeStrategy("bf16-mixed", "16-mixed")
    )
    with pytest.raises(UserError, match="chose different precisions.*set trainer.precision=16-mixed"):
        precision.check_ranks_agree(trainer)
    agreeing = SimpleNamespace(world_size=2, global_rank=rank, precision="bf16-mixed",
                               strategy=FakeStrategy("bf16-mixed", "bf16-mixed"))  # fmt: skip
    precision.check_ranks_agree(agreeing)


@pytest.mark.parametrize(("device", "expected"), [("cuda", "high"), ("cpu", "highest")])
def test_tf32_matmuls_on_cuda_only(monkeypatch, device, expected):
    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device, 0)))
    precision.use_tensor_cores(trainer)
    assert calls == ([expected] if device == "cuda" else [])


class FakeCuda:
    """torch.cuda's random state functions, recording which device they touch; the all-GPU ones fail."""

    def __init__(self, monkeypatch):
        self.touched = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        for name in ("get_rng_state_all", "set_rng_state_all", "manual_seed_all"):
            monkeypatch.setattr(torch.cuda, name, self.refuse)

    def get(self, device="cuda"):
        self.touched.append(("get", str(device)))
        return torch.tensor([int(torch.device(device).index or 0)], dtype=torch.uint8)

    def set(self, state, device="cuda"):
        self.touched.append(("set", str(device), int(state[0])))

    def refuse(self, *args, **kwargs):
        raise AssertionError("a CUDA context on every GPU")


def test_random_state_keeps_only_this_devices_cuda_state(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    states = random_state.random_states(torch.device("cuda", 1))
    random_state.set_random_states(states, torch.device("cuda", 1))
    assert cuda.touched == [("get", "cuda:1"), ("set", "cuda:1", 1)]
    cuda.touched.clear()
    random_state.set_random_states(
        {**states, "cuda": [torch.tensor([7]), torch.tensor([8])]}, torch.device("cuda", 1)
    )
    assert cuda.touched == [("set", "cuda:1", 8)]  # an older checkpoint's list: this device's entry


def test_random_state_of_a_cpu_run_touches_no_gpu(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    states = random_state.random_states(torch.device("cpu"))
    random_state.set_random_states({**states, "cuda": torch.tensor([3])}, torch.device("cpu"))
    assert "cuda" not in states and cuda.touched == []


def test_uint8_batches_normalised_on_the_device_equal_the_float_transform(tmp_path):
    """What crosses to the GPU is the uint8 batch; the model's normalisation there (here on the
    CPU, the same code) equals the classic float pipeline: ToDtype(float32, scale) + Normalize."""
    net = model()
    path = tmp_path / "photo.jpg"
    Image.fromarray(images(1, 80)[0].permute(1, 2, 0).numpy()).save(path)
    uint8 = eval_transform(image_size=64)(Image.open(path))
    assert uint8.dtype == torch.uint8
    mean, std = net.backbone.preprocessing.mean, net.backbone.preprocessing.std
    classic = T.Compose([
        eval_transform(image_size=64), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)
    ])  # fmt: skip
    on_device = net.normalize(uint8[None].to(net.device))
    assert on_device.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(on_device[0], classic(Image.open(path)), rtol=0, atol=1e-5)


def test_the_feature_cache_is_computed_at_the_eval_precision_and_keyed_by_it():
    """Validation from cached maps must see what submit computes from images."""
    x = images()
    full, half = model(), model(eval_precision="bf16")
    with torch.no_grad():
        assert (
            half.trunk_features(x).dtype == torch.bfloat16 and full.trunk_features(x).dtype == torch.float32
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast does not change it
            assert torch.equal(full.trunk_features(x), model().trunk_features(x))
        assert not torch.equal(half.trunk_features(x), full.trunk_features(x))
    assert "eval_precision" not in full.trunk_cut() and half.trunk_cut()["eval_precision"] == "bf16"
