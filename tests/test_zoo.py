"""The demo suite's baseline zoo: declarations, training, and the records the package ships."""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from robustbench_ft.datasets.registry import get_suite
from robustbench_ft.results import load_records
from robustbench_ft.util import stable_hash
from robustbench_ft.zoo.baselines import (
    DEMO_ZOO,
    DEMO_ZOO_DIR,
    FAMILIES,
    DigitTransform,
    ZooModel,
    build_network,
    train_zoo_model,
)


def _easy_task(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c is a bright 7x7 square in the c-th cell of a 4x3 grid on a noisy background."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n)
    images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        y, x = 7 * (c // 4), 7 * (c % 4)
        images[i, y:y + 7, x:x + 7] = 230
    return torch.from_numpy(images), torch.from_numpy(labels)


def test_declarations_are_unique_and_varied():
    names = [spec.name for spec in DEMO_ZOO]
    assert len(names) == len(set(names)) >= 15
    assert len({spec.family for spec in DEMO_ZOO}) >= 3
    assert len({spec.data_fraction for spec in DEMO_ZOO}) >= 3
    assert {spec.family for spec in DEMO_ZOO} <= set(FAMILIES)


def test_name_separates_every_recipe_field():
    base = ZooModel("mlp", 32)
    variants = [ZooModel("mlp", 64), ZooModel("mlp", 32, 2), ZooModel("mlp", 32, epochs=2),
                ZooModel("mlp", 32, data_fraction=0.5), ZooModel("mlp", 32, lr=1e-2),
                ZooModel("mlp", 32, batch_size=32), ZooModel("mlp", 32, seed=1)]
    assert len({base.name, *(v.name for v in variants)}) == 1 + len(variants)


@pytest.mark.parametrize("bad", [dict(family="svm"), dict(family="mlp", width=0),
                                 dict(family="linear", data_fraction=0.0), dict(family="linear", epochs=0),
                                 dict(family="linear", width=8), dict(family="lenet", width=8, depth=2)])
def test_invalid_declarations_are_rejected(bad):
    with pytest.raises(ValueError):
        ZooModel(**bad)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_maps_images_to_ten_logits(family):
    net = build_network(ZooModel(family, width=0 if family == "linear" else 2))
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_training_learns_an_easy_task_and_is_deterministic():
    x, y = _easy_task(600)
    spec = ZooModel("mlp", 16, epochs=3, data_fraction=0.5)
    model = train_zoo_model(spec, x, y)
    again = train_zoo_model(spec, x, y)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    x_test, y_test = _easy_task(200, seed=1)
    transform = DigitTransform()
    batch = torch.stack([transform(Image.fromarray(img.numpy(), "L")) for img in x_test])
    with torch.no_grad():
        accuracy = (model(batch).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.5  # chance is 0.1


def test_transform_turns_colour_images_into_one_normalised_channel():
    rgb = Image.fromarray(np.full((28, 28, 3), 255, dtype=np.uint8), "RGB")
    out = DigitTransform()(rgb)
    assert out.shape == (1, 28, 28) and out.dtype == torch.float32
    assert torch.allclose(out, torch.full_like(out, (1 - 0.1307) / 0.3081))


def test_shipped_records_cover_the_demo_suite():
    suite = get_suite("demo")
    records = load_records([DEMO_ZOO_DIR])
    assert len(records) >= 15
    declared = {spec.name: stable_hash(asdict(spec)) for spec in DEMO_ZOO}
    assert {r.model: r.config_hash for r in records} == declared, "stale records: rebuild with `robustbench-ft zoo baselines`"
    for r in records:
        assert r.kind == "baseline" and r.suite == "demo" and r.reference == suite.reference
        assert set(r.metrics) == set(suite.eval_datasets)
    reference = [r.reference_score for r in records]
    assert max(reference) - min(reference) >= 0.08
