"""A data check before the GPU hours: every example of every split read through the dataset."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import tqdm

from bmnas_jax.data import datasets
from bmnas_jax.data.feature_set import split_order
from bmnas_jax.data.source import input_specs, load_dataset, read_examples


def check_data(config, workers: int = 4) -> dict[str, Any]:
  """Reads every example of every split through `config.data.source` (no backbones).

  Every modality's input must have the shape and dtype of the first good train
  example, labels must be class ids in `[0, K)` (or `[K]` multi-hot 0/1 vectors).

  Returns:
    `{'source', 'examples': {split: n}, 'good': {split: n}, 'label_counts':
    {split: {class name: count}} (positives per class for multi-label data),
    'inputs': {modality: {'shape', 'dtype'}}, 'bad': [{'split', 'index', 'file',
    'reason'}]}`.
  """
  ds = load_dataset(config, datasets.DATASETS)
  modalities = tuple(config.data.modalities)
  names = list(ds.class_names) or [str(k) for k in range(ds.num_classes)]
  specs = input_specs(ds, modalities, scan=len(ds.splits["train"]))
  bad, good, counts = [], {}, {}
  for split in split_order(ds.splits):
    source = ds.splits[split]
    tally = np.zeros(ds.num_classes, np.int64)
    for i, inputs, label in tqdm.tqdm(
        read_examples(source, range(len(source)), modalities, specs, ds.label_kind,
                      ds.num_classes, workers),
        total=len(source), desc=f"check {split}", unit="ex", leave=False):
      if inputs is None:
        bad.append({"split": split, "index": i, "file": label.file, "reason": label.reason})
      elif ds.label_kind == "single":
        tally[int(label)] += 1
      else:
        tally += np.asarray(label, np.int64)
    good[split] = len(source) - sum(b["split"] == split for b in bad)
    counts[split] = collections.OrderedDict((names[k], int(c)) for k, c in enumerate(tally))
  return {"source": str(config.data.source), "label_kind": ds.label_kind,
          "examples": {s: len(ds.splits[s]) for s in split_order(ds.splits)}, "good": good,
          "label_counts": counts, "inputs": {m: s.to_json() for m, s in specs.items()},
          "bad": bad}
