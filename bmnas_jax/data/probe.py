"""Linear probes: how much of a backbone's own skill a pooled feature keeps."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler

from bmnas_jax.data import backbones


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
                 val_y: np.ndarray, label_kind: str, num_classes: int,
                 threshold: float = 0.3, max_iter: int = 300) -> tuple[str, float]:
  """Fits a logistic regression on standardized train features, scores it on val.

  Args:
    train_x, val_x: `[n, C_in, L_in]` pooled features (flattened per example).
    train_y, val_y: `[n]` class ids or `[n, K]` multi-hot.
    label_kind: `single` (multinomial) or `multi` (one-vs-rest, positive when the
      probability exceeds `threshold`).
    num_classes: K.

  Returns:
    `(metric name, value)`: accuracy, or weighted F1 for multi-label data (the
    backbones' own score, `backbones.score`, uses the same metric).
  """
  xt = np.asarray(train_x, np.float32).reshape(len(train_x), -1)
  xv = np.asarray(val_x, np.float32).reshape(len(val_x), -1)
  scaler = StandardScaler().fit(xt)
  xt, xv = scaler.transform(xt), scaler.transform(xv)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    warnings.simplefilter("ignore", UserWarning)    # labels absent from the train sample
    if label_kind == "single":
      model = LogisticRegression(max_iter=max_iter).fit(xt, np.asarray(train_y))
      proba = model.predict_proba(xv)
      # Scores over all classes, in class-id order (classes absent from train: -inf).
      logits = np.full((len(xv), num_classes), -np.inf)
      logits[:, model.classes_] = np.log(np.maximum(proba, 1e-12))
    else:
      model = OneVsRestClassifier(LogisticRegression(max_iter=max_iter)).fit(xt, train_y)
      proba = np.clip(model.predict_proba(xv), 1e-6, 1 - 1e-6)
      logits = np.log(proba) - np.log1p(-proba)
  return backbones.score(logits.astype(np.float32), np.asarray(val_y), label_kind, threshold)
