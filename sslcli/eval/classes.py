"""Train / val class agreement for the classifying evals (k-NN, linear probe).

Rule (docs/evals.md "Small data"): every val image must belong to a class the train set has,
or it could never be classified correctly and the accuracy would be lowered by a data mistake,
not by the features. So
- folders (class names known): val labels are mapped to train's class indices by name; a val
  class that train lacks is a DataError naming it (train classes absent from val are fine);
- feature files (integer labels only): a val label that no train feature carries is a DataError.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sslcli.errors import DataError


def _names(xs: Sequence[object]) -> str:
    """'a, b, c (+2 more)' or 'none'."""
    xs = [str(x) for x in xs]
    if not xs:
        return "none"
    return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")


def val_label_map(train_classes: Sequence[str], val_classes: Sequence[str], train_name: str,
                  val_name: str, what: str) -> Tensor | None:
    """LongTensor [len(val_classes)]: val class index -> train class index (by name); None when
    the two lists are equal (nothing to map). DataError when val has a class train lacks."""
    if list(train_classes) == list(val_classes):
        return None
    only_val = sorted(set(val_classes) - set(train_classes))
    if only_val:
        only_train = sorted(set(train_classes) - set(val_classes))
        raise DataError(f"{what}: val '{val_name}' has classes that train '{train_name}' lacks, so their "
                        f"images could never be classified correctly ({len(train_classes)} vs "
                        f"{len(val_classes)} classes; only in train: {_names(only_train)}; "
                        f"only in val: {_names(only_val)})")
    index = {name: i for i, name in enumerate(train_classes)}
    return torch.tensor([index[name] for name in val_classes], dtype=torch.long)


def remap(labels: Tensor, mapping: Tensor | None) -> Tensor:
    """labels [N] through `mapping` (val_label_map's; None = unchanged)."""
    return labels if mapping is None else mapping.to(labels.device)[labels]


def check_labels_seen(train_labels: Tensor, val_labels: Tensor, what: str) -> None:
    """DataError when val labels [M] hold a label that no train label [N] has."""
    unseen = sorted(set(torch.unique(val_labels).tolist()) - set(torch.unique(train_labels).tolist()))
    if unseen:
        count = int(torch.isin(val_labels, torch.tensor(unseen, device=val_labels.device)).sum())
        raise DataError(f"{what}: {count} val features have labels that no train feature has "
                        f"({_names(unseen)}); they could never be classified correctly")
