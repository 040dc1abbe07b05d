"""The baseline zoo of the demo suite: standard classifiers trained on MNIST's training split only.

Effective robustness (Taori et al., NeurIPS 2020) is a distance from a trend: across models that
never saw anything but the reference distribution, shift accuracy is close to a linear function of
reference accuracy on logit axes, and a robust model is one that sits above that line. The line
is only as good as its models, so the zoo varies what moves reference accuracy — model family
(logistic regression, MLPs, LeNet-style CNNs, a small ResNet), width, amount of training data and
training length — while keeping what a baseline must not have: no shift data, no augmentation, no
pretraining. Each model is one :class:`ZooModel` declaration in :data:`DEMO_ZOO` (in the style of
imagenet-testbed's model registry); :func:`build_demo_zoo` trains, evaluates and records them.

Every zoo model sees images through :class:`DigitTransform`, which is part of the model: colour
images (mnist-inverted) are converted to grayscale first, because the models were trained on
one-channel MNIST and a classifier has to be applied to the shift as it is.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from robustbench_ft.datasets.build import ensure_dataset
from robustbench_ft.datasets.registry import get_dataset, get_suite
from robustbench_ft.datasets.spec import Suite
from robustbench_ft.evaluation.options import EvalOptions
from robustbench_ft.evaluation.scoring import score_suite
from robustbench_ft.loading.shard_dataset import ShardDataset
from robustbench_ft.results import (
    RecordError,
    ResultRecord,
    load_record,
    now_iso,
    software_versions,
    write_record,
)
from robustbench_ft.util import slugify, stable_hash, unknown_name_error

SUITE = "demo"
EVAL_GROUP = 8
"""Models trained before one shared evaluation pass: amortises image decoding, bounds what an interruption loses."""
DEMO_ZOO_DIR = Path(__file__).resolve().parent.parent / "baselines" / "demo-zoo"
"""Where the package ships the demo zoo's result records (the ``demo-zoo`` baseline)."""

IMAGE_SIZE = 28
# Mean and standard deviation of MNIST training pixels (as fractions of 255), the usual constants.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


# --------------------------------------------------------------------------- preprocessing


def to_gray_array(image: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """A PIL image as a (size, size) uint8 array: converted to "L" (ITU-R 601 luma), resized if needed.

    For an RGB image whose three channels are equal (how shards store grayscale digits) the
    conversion returns those values exactly, so training images read from shards match MNIST.
    """
    gray = image.convert("L")
    if gray.size != (size, size):
        gray = gray.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(gray, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [..., H, W] as float with MNIST's mean and standard deviation removed."""
    return (images.float() / 255.0 - MNIST_MEAN) / MNIST_STD


@dataclass(frozen=True)
class DigitTransform:
    """PIL image -> normalised [1, 28, 28] float tensor: the zoo models' input pipeline.

    A dataclass so that its repr, which names the logits cache (``evaluate.transform_id``), lists
    every parameter.
    """

    size: int = IMAGE_SIZE

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return normalise(torch.from_numpy(to_gray_array(image, self.size)))[None]


# --------------------------------------------------------------------------- declarations

FAMILIES = ("linear", "mlp", "lenet", "resnet")


@dataclass(frozen=True)
class ZooModel:
    """One baseline model: architecture plus training recipe. The name is derived from the fields,
    so two declarations can never share a name while differing in recipe.

    ``width``: hidden units (mlp) or channels of the first convolution (lenet, resnet); unused (0)
    for linear. ``depth``: hidden layers (mlp) or residual blocks per stage (resnet); unused (1)
    otherwise. ``data_fraction``: the share of the 50 000 training images used, a random subset
    drawn with ``seed``. Training is Adam with a cosine learning-rate decay to zero over
    ``epochs`` passes of that subset.
    """

    family: str
    width: int = 0
    depth: int = 1
    epochs: int = 1
    data_fraction: float = 1.0
    lr: float = 3e-3
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown zoo family {self.family!r}; choose one of {FAMILIES}")
        if self.family != "linear" and self.width < 1:
            raise ValueError(f"a {self.family} zoo model needs width >= 1, got {self.width}")
        # fields a family ignores keep their defaults, so that the name identifies the model
        if self.family == "linear" and self.width != 0:
            raise ValueError(f"a linear zoo model has no width; leave it 0 (got {self.width})")
        if self.family in ("linear", "lenet") and self.depth != 1:
            raise ValueError(f"a {self.family} zoo model has a fixed depth; leave it 1 (got {self.depth})")
        if not 0.0 < self.data_fraction <= 1.0:
            raise ValueError(f"data_fraction must be in (0, 1], got {self.data_fraction}")
        if self.epochs < 1 or self.depth < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"epochs, depth, batch_size and lr must be positive: {self}")

    @property
    def name(self) -> str:
        arch = {"linear": "linear", "mlp": f"mlp-w{self.width}x{self.depth}",
                "lenet": f"lenet-w{self.width}", "resnet": f"resnet-w{self.width}x{self.depth}"}[self.family]
        name = f"{arch}-e{self.epochs}-f{self.data_fraction * 100:g}"
        # the rarely changed fields appear only when they differ from their defaults
        for key, value in (("lr", self.lr), ("b", self.batch_size), ("s", self.seed)):
            if value != _DEFAULTS[key]:
                name += f"-{key}{value:g}"
        return name


_DEFAULTS = {"lr": ZooModel.lr, "b": ZooModel.batch_size, "s": ZooModel.seed}


DEMO_ZOO: tuple[ZooModel, ...] = (
    ZooModel("linear", epochs=20, data_fraction=0.01),
    ZooModel("linear", epochs=10, data_fraction=0.02),
    ZooModel("linear", epochs=3, data_fraction=0.1),
    ZooModel("linear", epochs=1, data_fraction=1.0),
    ZooModel("linear", epochs=3, data_fraction=1.0),
    ZooModel("mlp", 32, epochs=1, data_fraction=0.1),
    ZooModel("mlp", 128, epochs=3, data_fraction=0.1),
    ZooModel("mlp", 128, epochs=1, data_fraction=1.0),
    ZooModel("mlp", 256, 2, epochs=3, data_fraction=0.3),
    ZooModel("mlp", 512, epochs=3, data_fraction=1.0),
    ZooModel("mlp", 256, 2, epochs=3, data_fraction=1.0),
    ZooModel("lenet", 4, epochs=10, data_fraction=0.02),
    ZooModel("lenet", 4, epochs=1, data_fraction=0.1),
    ZooModel("lenet", 4, epochs=2, data_fraction=1.0),
    ZooModel("lenet", 8, epochs=3, data_fraction=0.3),
    ZooModel("lenet", 8, epochs=2, data_fraction=1.0),
    ZooModel("lenet", 16, epochs=1, data_fraction=1.0),
    ZooModel("resnet", 8, epochs=5, data_fraction=0.02, lr=1e-2, batch_size=32),
    ZooModel("resnet", 8, epochs=1, data_fraction=0.1, lr=1e-2, batch_size=32),
    ZooModel("resnet", 8, epochs=1, data_fraction=0.3, lr=1e-2, batch_size=32),
    ZooModel("resnet", 4, epochs=2, data_fraction=0.3, lr=1e-2, batch_size=32),
)
"""The demo suite's baseline models: 80 % to 99 % MNIST accuracy (table and trend: docs/demo_zoo.md)."""


# --------------------------------------------------------------------------- networks


class _ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (a strided 1x1 projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out else
                         nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def _linear(spec: ZooModel) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(IMAGE_SIZE * IMAGE_SIZE, 10))


def _mlp(spec: ZooModel) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width_in = IMAGE_SIZE * IMAGE_SIZE
    for _ in range(spec.depth):
        layers += [nn.Linear(width_in, spec.width), nn.ReLU()]
        width_in = spec.width
    return nn.Sequential(*layers, nn.Linear(width_in, 10))


def _lenet(spec: ZooModel) -> nn.Module:
    """LeNet-5's layout: two 5x5 conv + max-pool stages (28 -> 24 -> 12 -> 8 -> 4), two dense layers."""
    w = spec.width
    return nn.Sequential(
        nn.Conv2d(1, w, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * w * 16, 8 * w), nn.ReLU(), nn.Linear(8 * w, 10),
    )


def _resnet(spec: ZooModel) -> nn.Module:
    """A 3x3 stem and three stages (28, 14, 7 pixels; width w, 2w, 4w) of ``depth`` blocks, global pooling."""
    w = spec.width
    layers: list[nn.Module] = [nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
    c_in = w
    for stage, c_out in enumerate((w, 2 * w, 4 * w)):
        for block in range(spec.depth):
            layers.append(_ResidualBlock(c_in, c_out, stride=2 if stage > 0 and block == 0 else 1))
            c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10))


_BUILDERS: dict[str, Callable[[ZooModel], nn.Module]] = {
    "linear": _linear, "mlp": _mlp, "lenet": _lenet, "resnet": _resnet,
}


def build_network(spec: ZooModel) -> nn.Module:
    """The untrained network of a declaration: [B, 1, 28, 28] normalised images -> [B, 10] logits."""
    return _BUILDERS[spec.family](spec)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- training


def train_zoo_model(spec: ZooModel, train_images: torch.Tensor, train_labels: torch.Tensor) -> nn.Module:
    """Train one zoo model on uint8 images [N, 28, 28] and int64 labels [N]; returns it in eval mode.

    Deterministic for a given ``spec.seed`` on the same hardware and thread count: the seed fixes
    the initialisation, the training subset and the order of every epoch.
    """
    if train_images.dtype != torch.uint8 or train_images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"train_images must be uint8 [N, {IMAGE_SIZE}, {IMAGE_SIZE}], "
                         f"got {train_images.dtype} {tuple(train_images.shape)}")
    if len(train_images) != len(train_labels):
        raise ValueError(f"{len(train_images)} training images but {len(train_labels)} labels")
    torch.manual_seed(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    n = max(1, round(spec.data_fraction * len(train_images)))
    subset = torch.randperm(len(train_images), generator=generator)[:n]
    images, labels = normalise(train_images[subset]).unsqueeze(1), train_labels[subset].long()

    model = build_network(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr)
    steps_per_epoch = math.ceil(n / spec.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=spec.epochs * steps_per_epoch)
    model.train()
    for _ in range(spec.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, spec.batch_size):
            batch = order[start:start + spec.batch_size]
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def load_split(directory: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A shard set as uint8 images [N, 28, 28] and int64 labels [N], in manifest order.

    Holding MNIST's 50 000 training images in memory (39 MB) lets every model shuffle freely
    and read each image once instead of once per epoch.
    """
    images, labels = [], []
    for image, label in ShardDataset(directory):
        images.append(to_gray_array(image))
        labels.append(label)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


# --------------------------------------------------------------------------- records


def _record_path(out_dir: Path, spec: ZooModel) -> Path:
    return Path(out_dir) / f"{slugify(spec.name)}.json"


def _is_current(path: Path, config_hash: str) -> bool:
    """Whether a record for this exact declaration already exists (a damaged file counts as absent)."""
    if not path.is_file():
        return False
    try:
        return load_record(path).config_hash == config_hash
    except RecordError:
        return False


def _select(zoo: tuple[ZooModel, ...], only: list[str] | None) -> list[ZooModel]:
    if only is None:
        return list(zoo)
    by_name = {spec.name: spec for spec in zoo}
    for name in only:
        if name not in by_name:
            raise unknown_name_error("zoo model", name, list(by_name))
    wanted = set(only)
    return [spec for spec in zoo if spec.name in wanted]


def build_demo_zoo(out_dir: Path, data_root: Path, only: list[str] | None = None, progress: bool = True,
                   zoo: tuple[ZooModel, ...] = DEMO_ZOO) -> list[Path]:
    """Train every zoo model (or those named in ``only``) on the demo suite's training split,
    evaluate it on the reference and every shift, and write one ``kind="baseline"`` record per
    model to ``out_dir/<name>.json``. Returns the record paths, in declaration order.

    Resumable: a model whose record exists with the same config hash is skipped, so an interrupted
    build continues where it stopped and a changed declaration is retrained. Models are trained
    in groups of ``EVAL_GROUP`` and each group is evaluated in one pass per dataset (decoding the
    34 000 test images takes longer than training most zoo models); ``timings["eval"]`` is the
    group's evaluation time divided by its size.
    """
    suite = get_suite(SUITE)
    log = print if progress else (lambda *_: None)
    specs = _select(zoo, only)
    paths = [_record_path(out_dir, spec) for spec in specs]
    todo = [(spec, path) for spec, path in zip(specs, paths) if not _is_current(path, stable_hash(asdict(spec)))]
    if len(todo) < len(specs):
        log(f"{len(specs) - len(todo)} of {len(specs)} zoo records are up to date in {out_dir}")
    if not todo:
        return paths

    train_name, train_split = suite.train
    train_images, train_labels = load_split(ensure_dataset(get_dataset(train_name), Path(data_root), train_split, log=log))
    eval_dirs = {ds: ensure_dataset(get_dataset(ds), Path(data_root), "test", log=log) for ds in suite.eval_datasets}
    for first in range(0, len(todo), EVAL_GROUP):
        group = todo[first:first + EVAL_GROUP]
        models, train_seconds = {}, {}
        for spec, _ in group:
            start = time.perf_counter()
            models[spec.name] = train_zoo_model(spec, train_images, train_labels)
            train_seconds[spec.name] = time.perf_counter() - start
            log(f"trained {spec.name} in {train_seconds[spec.name]:.1f}s")
        start = time.perf_counter()
        metrics = _evaluate_group(models, suite, eval_dirs)
        eval_seconds = (time.perf_counter() - start) / len(group)
        for spec, path in group:
            record = _zoo_record(spec, suite, models[spec.name], metrics[spec.name],
                                 {"train": round(train_seconds[spec.name], 2), "eval": round(eval_seconds, 2)})
            write_record(record, path)
            accs = "  ".join(f"{ds} {record.score(ds):.4f}" for ds in suite.eval_datasets)
            log(f"{spec.name}: {accs}")
    return paths


def _evaluate_group(models: dict[str, nn.Module], suite: Suite, eval_dirs: dict[str, Path]) -> dict[str, dict[str, dict]]:
    """model name -> dataset -> metrics, one pass per dataset, scored as the runner scores candidates."""
    specs = {ds: get_dataset(ds) for ds in eval_dirs}
    return score_suite(models, specs, eval_dirs, suite.reference, DigitTransform(),
                       EvalOptions(batch_size=500, progress=False)).metrics


def _zoo_record(spec: ZooModel, suite: Suite, model: nn.Module, metrics: dict[str, dict],
                timings: dict[str, float]) -> ResultRecord:
    config = asdict(spec)
    return ResultRecord(
        record_id=stable_hash(["demo-zoo", spec.name])[:16], suite=suite.name, model=spec.name,
        pretrained="none", method="supervised", candidate=spec.name, reference=suite.reference,
        shifts=list(suite.shifts), metrics=metrics,
        primary_metric={ds: get_dataset(ds).metric for ds in metrics},
        tags={"family": spec.family, "params": count_parameters(model), "epochs": spec.epochs,
              "data_fraction": spec.data_fraction},
        kind="baseline", config=config, config_hash=stable_hash(config), versions=software_versions(),
        timings=timings, created=now_iso(), citation="",
    )
