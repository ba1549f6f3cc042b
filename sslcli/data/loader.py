"""Training data loading: deterministic per-sample augmentation, epoch batch sampler, collate.

Determinism contract: the crops of image i in epoch e depend only on (seed, e, i) -- not on the
number of workers, the number of processes or the resume point. `EpochBatchSampler` yields
(epoch, index) pairs; `TrainSet` seeds Python's `random` and torch's CPU generator from
(seed, epoch, index) before the transform, and restores both afterwards so that in-process
loading (workers=0) leaves the caller's RNG streams (e.g. the model's dropout) untouched.

Neighbour bootstrapping: the sampler holds the epoch's plan j* [N] (set by the engine before the
epoch, `EpochBatchSampler.plan`) and yields (epoch, i, j*) triples; the loader workers load x_i
for the first global view and the local views and x_{j*} for the second global view. The plan
travels as three ints per sample in the index queue: nothing is shared between processes.

Masked image modelling (`data.masking`: dinov2 | ibot, sslcli.data.masking.MaskPlan): the sampler
draws each global batch's per-slot target patch counts from (seed, epoch, step) and appends a
sample's G targets to its key, (epoch, i, j, t_1, ..., t_G) (j = i without bootstrapping); the
worker draws the sample's block masks [G, N] from its own (seed, epoch, i) generator and
collate_views stacks them into Batch.masks [G, B, N]. Crops and random streams are unchanged.

`data.decode_on: device` (CUDA): the workers read bytes instead of decoding, make the same draws
from the image sizes and ship DecodePlans; `Batch.decode` cuts the crops on the device
(sslcli.data.decode).
"""

from __future__ import annotations

import logging
import multiprocessing
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sslcli.config import DataConfig
from sslcli.data.batch import Batch
from sslcli.data.datasets import ImageDataset
from sslcli.data.decode import DecodeGeometry, DecodePlan, EncodedViews, decodes_on_device
from sslcli.data.masking import MaskPlan
from sslcli.data.photometric import PhotometricParams
from sslcli.data.transforms import train_transform
from sslcli.errors import DataError

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_BAD = 50


def sample_seed(base_seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed derived from (base_seed, epoch, index) with numpy's SeedSequence hash."""
    words = np.random.SeedSequence([base_seed % 2**63, epoch, index]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class TrainSet(Dataset):
    """Augmented training samples addressed by (epoch, index).

    `trainset[(epoch, i)]`, `trainset[(epoch, i, j)]` or `trainset[(epoch, i, j, t_1, ..., t_G)]` ->
    {"crops": list of tensors (one per view), "params": None or one photometric-parameter dict per
    view (augment_on: device, with uint8 crops), "index": int, "label": int, "second": int,
    "bad": int, "seed": int, "masks": None or bool [G, N]}; with j != i the second global view is
    cropped from image j ("second"); "seed" is the sample's (seed, epoch, i) seed. With targets t
    (masking on) "masks" are `masks.draw(seed, t)`, drawn after the crops from their own generator.
    When image i cannot be read, the next images (i+1, i+2, ... mod N) are tried deterministically;
    "index"/"label" are those of the image used and "bad" counts the skipped ones (an unreadable x_j
    gives a standard pair, also counted). A warning is logged once per bad file per process;
    DataError after MAX_CONSECUTIVE_BAD consecutive failures. With a DecodeGeometry transform (`decode_on: device`)
    images are read with `ImageDataset.load_source` and "crops" is a DecodePlan (sslcli.data.decode).
    """

    def __init__(self, dataset: ImageDataset, transform: Callable, base_seed: int, masks: MaskPlan | None = None):
        self.dataset = dataset
        self.transform = transform
        self.base_seed = base_seed
        self.masks = masks
        # decode_on: device: bytes + header sizes (DecodeGeometry), not decoded images
        self._read = dataset.load_source if getattr(transform, "reads_sources", False) else dataset.load
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def _load_first_good(self, index: int):
        """(image, index used, number of unreadable images skipped)."""
        n = len(self.dataset)
        for bad in range(min(MAX_CONSECUTIVE_BAD, n)):
            j = (index + bad) % n
            img = self._try_load(j)
            if img is not None:
                return img, j, bad
        raise DataError(f"{min(MAX_CONSECUTIVE_BAD, n)} consecutive unreadable images from id "
                        f"{index} in '{self.dataset.name}' (e.g. {self.dataset.paths[index]})")

    def _augment(self, img, second, seed: int):
        """Run the transform under `seed`, then restore the caller's RNG states."""
        py_state, torch_state = random.getstate(), torch.default_generator.get_state()
        try:
            random.seed(seed)
            torch.default_generator.manual_seed(seed)  # CPU only: CUDA generators untouched
            return self.transform(img) if second is None else self.transform(img, second)
        finally:
            random.setstate(py_state)
            torch.default_generator.set_state(torch_state)

    def _try_load(self, j: int):
        """Image j, or None when it cannot be read (warned once per file and process)."""
        try:
            return self._read(j)
        except Exception as e:  # PIL raises many types on corrupt files
            if j not in self._warned:
                self._warned.add(j)
                logger.warning("skipping unreadable image %d (%s): %s: %s", j, self.dataset.paths[j],
                               type(e).__name__, e)
            return None

    def __getitem__(self, key: tuple[int, ...]) -> dict:
        epoch, index = int(key[0]), int(key[1])
        img, used, bad = self._load_first_good(index)
        second, j = None, used
        if len(key) > 2 and int(key[2]) != index and used == index:
            second = self._try_load(int(key[2]))
            j, bad = (int(key[2]), bad) if second is not None else (used, bad + 1)
        seed = sample_seed(self.base_seed, epoch, index)
        out = self._augment(img, second, seed)
        crops, params = out if isinstance(out, tuple) else (out, None)  # device path: (uint8 crops, params)
        return {"crops": crops, "params": params, "index": used, "label": int(self.dataset.labels[used]),
                "second": j, "bad": bad, "seed": seed, "masks": self._masks(seed, key[3:])}

    def _masks(self, seed: int, targets: tuple[int, ...]):
        """bool [G, N] masks of the sample's global crops, or None when its key carries no targets."""
        if not targets:
            return None
        if self.masks is None:
            raise ValueError("the sample key carries mask targets but this TrainSet has no MaskPlan")
        return self.masks.draw(seed, [int(t) for t in targets])


class EpochBatchSampler(Sampler):
    """Per-rank batches of (epoch, index) pairs, identical in union to the single-process run.

    Epoch e: perm = torch.randperm(n, generator seeded with seed + e); global batch s =
    perm[s*B:(s+1)*B] (the last incomplete batch is dropped); rank r takes its slice
    [r*b:(r+1)*b], b = B // world. Each `iter()` yields the rest of the current epoch from the
    current step, then moves to the start of the next epoch. The position advances when the
    iteration starts (first batch drawn), not as batches are consumed (workers prefetch): the
    engine keeps its own (epoch, step) for checkpoints and calls `set_position` on resume.

    mask_plan: (epoch, step) -> int64 [G, batch_size_total] target patch counts of the global
    batch's crop slots (MaskPlan.targets); when set, keys become (epoch, i, j, t_1, ..., t_G) with
    this rank's columns of the plan, so the targets follow the position in the global batch.
    """

    def __init__(self, n: int, batch_size_total: int, rank: int, world: int, seed: int,
                 start_epoch: int = 0, start_step: int = 0,
                 mask_plan: Callable[[int, int], torch.Tensor] | None = None):
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"invalid rank {rank} for world size {world}")
        self.check_sizes(n, batch_size_total, world)
        self.mask_plan = mask_plan
        self.n, self.batch_size_total, self.rank, self.world = n, batch_size_total, rank, world
        self.batch_size = batch_size_total // world
        self.seed = seed
        self.plan: torch.Tensor | None = None  # j* [n] of the coming epoch (bootstrapping), else None
        self.set_position(start_epoch, start_step)

    @staticmethod
    def check_sizes(n: int, batch_size_total: int, world: int) -> int:
        """Steps per epoch of n images in global batches of batch_size_total over `world` processes;
        DataError when the batch does not split evenly or exceeds the dataset (so the trainer can
        check before it builds the method, which needs steps per epoch)."""
        if batch_size_total < 1 or batch_size_total % world:
            raise DataError(f"batch size {batch_size_total} is not divisible by the number of "
                            f"processes {world}")
        if n < batch_size_total:
            raise DataError(f"dataset has {n} images, fewer than the batch size {batch_size_total}")
        return n // batch_size_total

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch (n // batch_size_total)."""
        return self.n // self.batch_size_total

    @property
    def epoch(self) -> int:
        """The epoch the next `iter()` yields."""
        return self._epoch

    @property
    def step(self) -> int:
        """The step within `epoch` at which the next `iter()` starts."""
        return self._step

    def set_position(self, epoch: int, step: int) -> None:
        """Make the next `iter()` start at batch `step` of `epoch` (0 <= step <= steps_per_epoch;
        step == steps_per_epoch means the start of the next epoch)."""
        if epoch < 0 or not 0 <= step <= self.steps_per_epoch:
            raise ValueError(f"invalid position epoch={epoch} step={step} "
                             f"(steps per epoch: {self.steps_per_epoch})")
        if step == self.steps_per_epoch:
            epoch, step = epoch + 1, 0
        self._epoch, self._step = epoch, step

    def global_batches(self, epoch: int) -> torch.Tensor:
        """All global batches of `epoch`: int64 [steps_per_epoch, batch_size_total]."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=g)
        return perm[: self.steps_per_epoch * self.batch_size_total].view(self.steps_per_epoch, -1)

    def __len__(self) -> int:
        return self.steps_per_epoch - self._step

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        return self._batches()

    def _batches(self) -> Iterator[list[tuple[int, ...]]]:
        # A generator: the position is read and advanced at the first next(), not at iter().
        # DataLoader calls iter() on its batch sampler twice when it starts workers and drops
        # the first iterator unused; that one must not consume an epoch.
        epoch, step = self._epoch, self._step
        self._epoch, self._step = epoch + 1, 0
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        plan, mask_plan = self.plan, self.mask_plan
        for s, batch in enumerate(self.global_batches(epoch)[step:, lo:hi], start=step):
            ids = batch.tolist()
            if mask_plan is not None:
                seconds = ids if plan is None else plan[batch].tolist()
                targets = mask_plan(epoch, s)[:, lo:hi].t().tolist()  # (b, G): this rank's slots
                yield [(epoch, i, j, *t) for i, j, t in zip(ids, seconds, targets)]
            elif plan is None:
                yield [(epoch, i) for i in ids]
            else:
                yield [(epoch, i, j) for i, j in zip(ids, plan[batch].tolist())]


def collate_views(samples: list[dict], global_views: int = 2,
                  colour: tuple[Sequence[float], Sequence[float]] | None = None) -> Batch:
    """Stack TrainSet samples into a Batch (the first `global_views` crops are the global views).

    colour: (mean, std): run the batched colour chain (Batch.colour) here, in the loader worker, so
    the Batch arrives with float32 views (training on a CPU, see build_train_loader); None: the
    uint8 views and their parameters travel and the trainer colours them on its device.

    DecodePlans (`decode_on: device`) become `Batch.encoded`, the views then empty until Batch.decode.
    Sample masks [G, N] (masking on) stack into Batch.masks [G, B, N]; None otherwise.
    """
    views, encoded = [], None
    if isinstance(samples[0]["crops"], DecodePlan):
        encoded = EncodedViews.collate([s["crops"] for s in samples], [(s["index"], s["second"]) for s in samples],
                                       global_views)
    else:
        views = [torch.stack([s["crops"][v] for s in samples]) for v in range(len(samples[0]["crops"]))]
    photometric = None
    if samples[0].get("params") is not None:  # device path: uint8 views + their colour parameters
        photometric = [PhotometricParams.stack([s["params"][v] for s in samples])
                       for v in range(len(samples[0]["params"]))]
    batch = Batch(
        global_views=views[:global_views], local_views=views[global_views:],
        ids=torch.tensor([s["index"] for s in samples], dtype=torch.long),
        second_ids=torch.tensor([s["second"] for s in samples], dtype=torch.long),
        labels=torch.tensor([s["label"] for s in samples], dtype=torch.long),
        seeds=torch.tensor([s["seed"] for s in samples], dtype=torch.long),
        bad=torch.tensor(sum(s["bad"] for s in samples), dtype=torch.long),
        masks=_stack_masks(samples), photometric=photometric, encoded=encoded,
    )
    return batch if colour is None else batch.colour(*colour)


def _stack_masks(samples: list[dict]) -> torch.Tensor | None:
    """Per-sample (G, N) bool masks -> (G, B, N) bool (view-major, as the views), or None."""
    if samples[0].get("masks") is None:
        return None
    return torch.stack([s["masks"] for s in samples], dim=1)


def build_train_loader(dataset: ImageDataset, cfg: DataConfig, batch_size_total: int, rank: int,
                       world: int, seed: int, workers: int,
                       pin_memory: bool, device: torch.device | str | None = None,
                       decode_on_cpu: bool = False,
                       mask_grid: tuple[int, int] | None = None) -> tuple[DataLoader, EpochBatchSampler]:
    """DataLoader of multi-crop batches for this rank, and its sampler (for set_position).

    Each batch is a `Batch` (collate_views) of b = batch_size_total // world images. Workers are
    persistent with prefetch_factor 4 when workers > 0. `seed` must be the same on all ranks.
    `device`: the training device; `data.decode_on: device` applies on CUDA only (decodes_on_device),
    then the batches need `Batch.decode(device)`. `decode_on_cpu`: apply it on any device (benchmarks).
    With `data.augment_on: device` and a CPU `device` the workers also colour the batches (collate_views'
    `colour`), so `Batch.colour` in the training process has nothing left to do; otherwise (a GPU, or no
    device given) the batches carry uint8 views and their colour parameters.
    `mask_grid`: (h, w) patches of a global crop; required when `cfg.masking` is not none (the
    batches then carry Batch.masks [G, B, h * w]), ignored otherwise.
    """
    masks = _mask_plan(cfg, mask_grid, batch_size_total, seed)
    sampler = EpochBatchSampler(len(dataset), batch_size_total, rank, world, seed,
                                mask_plan=None if masks is None else masks.targets)
    decode_here = decodes_on_device(cfg, device, decode_on_cpu)
    transform = DecodeGeometry(cfg) if decode_here else train_transform(cfg)
    trainset = TrainSet(dataset, transform, base_seed=seed, masks=masks)
    collate = collate_views
    if cfg.augment_on == "device" and not decode_here and device is not None and torch.device(device).type == "cpu":
        # Training on a CPU, the CPU is the device: the batched colour chain runs in the workers beside
        # the crops, on time their cores have to spare, instead of on the training thread (demo: ~15 ms
        # of a ~170 ms step). Same function, same values; on a GPU it stays there (Batch.colour).
        collate = partial(collate_views, colour=(tuple(cfg.mean), tuple(cfg.std)))
    loader = DataLoader(trainset, batch_sampler=sampler, num_workers=workers,
                        collate_fn=collate, pin_memory=pin_memory,
                        persistent_workers=workers > 0,
                        prefetch_factor=4 if workers > 0 else None,
                        multiprocessing_context=worker_start_method() if workers > 0 else None,
                        worker_init_fn=quiet_connection_errors,
                        # its own generator: creating an epoch's iterator must not draw from the
                        # global RNG, or a resumed run's drop-path stream would differ
                        generator=torch.Generator().manual_seed(seed))
    return loader, sampler


def worker_start_method() -> str | None:
    """'fork' where the platform has it, else the default. Forked workers start at once and share
    the dataset's memory; under spawn (the default inside `--procs`/`--gpus` processes, which are
    spawned) and forkserver (Python 3.14's default) every worker re-imports torch and receives the
    pickled dataset, and a worker whose training process dies mid-start prints a traceback.
    Workers never touch CUDA, so forking after CUDA initialisation is safe (as under torchrun)."""
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def quiet_connection_errors(worker_id: int) -> None:
    """Loader worker init: a ConnectionError reaching sys.excepthook in a worker (torch's
    tensor-sharing server thread reports through it) means the training process is gone (killed);
    its launcher prints the one line that matters, so the orphaned worker adds no traceback."""
    default = sys.excepthook

    def hook(kind, value, traceback) -> None:
        if not issubclass(kind, ConnectionError):
            default(kind, value, traceback)

    sys.excepthook = hook


def _mask_plan(cfg: DataConfig, grid: tuple[int, int] | None, batch_size_total: int, seed: int) -> MaskPlan | None:
    """The run's MaskPlan (None with masking: none); a missing grid is a programming error."""
    if cfg.masking == "none":
        return None
    if grid is None:
        raise ValueError(f"data.masking={cfg.masking} needs the global crops' patch grid (mask_grid)")
    return MaskPlan.build(cfg, grid, batch_size_total, seed)
