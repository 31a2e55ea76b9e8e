"""Read shard sets as streams: class-balanced training, exactly-once evaluation, DDP-safe.

The training loop needs four calls (no ``accelerator.prepare`` on these loaders: they
split the data by rank themselves, and ``prepare`` would split it again or dispatch it)::

    from maskdist import streams
    from maskdist.data import transforms

    shard_set = open_shard_set("shards/full")
    train, steps = streams.train_loader(
        shard_set, streams.folds_except(shard_set, fold), batch_size=64,
        rank=accelerator.process_index, world_size=accelerator.num_processes,
        workers=8, seed=cfg.seed, alpha=0.0, transform="recipe")
    val = streams.eval_loader(shard_set, fold, batch_size=128, rank=..., world_size=..., workers=4)
    for epoch in range(epochs):
        train.set_epoch(epoch)                       # before iterating: reaches persistent workers
        for batch in train:                          # exactly `steps` batches on every rank
            x = transforms.to_device(batch["image"], accelerator.device, mean, std)
            y = batch["label"].to(accelerator.device)
            ...
        for batch in val:                            # ranks may get different batch counts:
            ...                                      # use the unwrapped model, gather (key, pred)
                                                     # pairs with gather_object, de-duplicate by key

Batches are dicts: ``image`` (uint8 NCHW tensor), ``key`` (list of str), and from the
sample's json ``label`` and ``label_true`` (int64 tensors; training folds) or ``row``
(int64; the eval split). Normalise on the device with :func:`maskdist.data.transforms.to_device`.

Training stream (:func:`train_loader`)
    * Per class an infinite stream: the class's shards in a fresh random order on every pass,
      each shard read from a random start sample round to the one before it (so ranks and
      workers do not walk a one-shard class in lockstep, and every sample stays equally
      likely). Classes are mixed with probability ``n_c ** alpha / sum`` (``n_c`` from the
      manifest; ``alpha`` 0 uniform = default, 0.5 square root, 1 natural); a class with no
      samples in the selection gets probability 0 and is never opened. A shuffle buffer of
      ``shuffle_buffer`` raw (undecoded) samples follows; only what leaves it is decoded.
    * Randomness comes from local ``random.Random`` generators seeded from ``(seed, rank,
      worker, epoch)`` and augmentation seeded per batch from ``(..., batch)``: ranks and
      workers never replay one sequence, epochs differ, and the same arguments reproduce the
      same batches. The epoch reaches persistent workers through a shared
      ``multiprocessing.Value`` (:meth:`StreamLoader.set_epoch`); without ``set_epoch`` calls
      each worker counts its own passes instead.
    * Resuming inside an epoch: ``set_epoch(epoch, start_step)`` makes the workers draw the
      batches before ``start_step`` without decoding them and yield the rest, in the order
      and with the augmentation of an uninterrupted epoch.
    * Damage: a shard that cannot be read (after the set's retries) or that is damaged (a
      tar header, a sample's json or JPEG that does not decode) is skipped for the rest of
      the epoch and reported with the next batch; the loader names it once (a warning),
      records it in ``loader.skipped`` and raises MaskdistError when a class has lost all
      its shards or the skipped shards hold more than ``max_skipped`` of the epoch's samples.
      A worker's MaskdistError reaches the caller as one line, not a worker traceback.
    * Epoch length: ``steps = ceil(train_samples / (batch_size * world_size))``. The rank's
      ``steps`` are split among its workers exactly (worker ``w`` makes
      ``steps // workers + (w < steps % workers)`` full batches of an infinite stream), and
      the DataLoader yields the sum, so every rank yields exactly ``steps`` full batches
      whatever the shard count, class sizes or worker count.

Evaluation stream (:func:`eval_loader`)
    Every sample of a fold (its competition samples, never extra) or of the eval split
    exactly once across all ranks and workers: shards are split among ranks (balanced by
    sample count) when there are at least as many shards as ranks, else samples by index
    modulo; then the same again among the rank's workers. Partial last batches are kept, so
    ranks may yield different numbers of batches (``len(loader)`` says how many). A shard
    that cannot be read is an error naming it: evaluation never silently reads less.

Reading and decoding
    Shards are read with a small strict tar reader (:class:`maskdist.shards.tario.TarReader`, one
    512-byte header parse per member; 3-4x cheaper per sample than :mod:`tarfile`), which
    reads only the ``.jpg`` and ``.json`` members; any other member (a ``.pyd`` pickle, say)
    is skipped unread and never decoded, and a header that is not plain ustar/pax (bad
    checksum, GNU extensions, links, truncation) raises :class:`ShardFormatError`. Images
    are decoded and transformed straight into the batch tensor (in shared memory inside a
    DataLoader worker, so passing it to the main process copies nothing); a stored image
    that already has the transform's resize size (the default ``--image-size 224x224``
    build) is not resized again. A transform that would enlarge the stored images gets a
    warning when the loader is made (:func:`check_stored_size`).
"""
from __future__ import annotations

from maskdist.streams.evaluation import EvalStream, eval_plan, eval_shards
from maskdist.streams.loader import StreamLoader, check_shared_memory, eval_loader, shared_memory_bytes, train_loader
from maskdist.streams.samples import ERROR, RESUME_PADDING, SKIPPED, BadSample, collate, read_shard
from maskdist.streams.selection import check_stored_size, class_probabilities, derive_seed, folds_except
from maskdist.streams.training import DEFAULT_MAX_SKIPPED, DEFAULT_SHUFFLE_BUFFER, TrainStream

__all__ = ["BadSample", "DEFAULT_MAX_SKIPPED", "DEFAULT_SHUFFLE_BUFFER", "ERROR", "EvalStream", "RESUME_PADDING", "SKIPPED",
           "StreamLoader", "TrainStream", "check_shared_memory", "check_stored_size", "class_probabilities", "collate", "derive_seed",
           "eval_loader", "eval_plan", "eval_shards", "folds_except", "read_shard", "shared_memory_bytes", "train_loader"]
