"""What a conditional model (Sohn et al. 2015) is given beside the data: a class label as a one-hot vector or
attributes as ±1, joined to the encoder's input and to the decoder's code, so that decoding a code with a
chosen label gives an example of that label."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from autoenc.util.errors import UserError, require


class Condition:
    """No condition (model.condition=null): the encoder and decoder see the data and the code alone."""

    width = 0  # the condition vector's length

    @classmethod
    def kind(cls, name: str | None) -> type["Condition"]:
        """The class `model.condition` names: null (this one), label or attributes."""
        kinds = {k.__name__.lower(): k for k in cls.__subclasses__()}
        require(name is None or name in kinds, "model.condition", name, f"null, {' or '.join(kinds)}")
        return cls if name is None else kinds[name]

    @classmethod
    def named(cls, name: str | None, labels=None) -> "Condition":
        """The condition `model.condition` names, over `labels`: the number of classes for label, the attribute
        names for attributes."""
        kind = cls.kind(name)
        return kind() if kind is Condition else kind(labels)

    @classmethod
    def labels_from(cls, y: torch.Tensor, names: list[str]):
        """What `model.labels` is for a training split's labels y and its attribute names."""
        return None

    def vector(self, y: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """The condition of n examples with labels y, as a float matrix (n, width); None without one."""
        return None

    @staticmethod
    def join(t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """t with the condition beside it: extra features of a vector (B, D), extra constant channels of a
        map (B, C, H, W)."""
        if c is None:
            return t
        c = c.to(t.dtype)
        return torch.cat([t, c.view(*c.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:])], 1)

    def rows(self) -> list[tuple[str, torch.Tensor]]:
        """What each row of a conditional model's samples picture is given: (its name, its y)."""
        return []

    def of(self, chosen) -> torch.Tensor:
        """The labels y that `sample label=…` / `attributes=[…]` choose, for one example."""
        raise UserError("this model is not conditional: sample draws from the whole prior (train with "
                        "model.condition=label or attributes to choose what to sample)")


class Label(Condition):
    """A class label as a one-hot vector over `labels` classes (0 … labels − 1)."""

    def __init__(self, labels: int):
        require(isinstance(labels, int) and labels >= 2, "model.labels", labels, "the number of classes, ≥ 2")
        self.width = labels

    def vector(self, y, n):
        if y is None:
            raise UserError("this model is conditional (model.condition=label): give each example's label "
                            f"(a split's own, or label=0…{self.width - 1})")
        y = torch.as_tensor(y).long()
        y = y.expand(n) if y.dim() == 0 else y.reshape(-1)
        if bool((y < 0).any()):
            raise UserError("these examples have no labels, which a conditional model (model.condition=label) needs: "
                            "use a split of its data (split=test) or labelled arrays")
        wrong = y[y >= self.width]
        if len(wrong):
            raise UserError(f"label={int(wrong[0])} is not one of this model's classes 0…{self.width - 1}")
        return F.one_hot(y, self.width).float()

    @classmethod
    def labels_from(cls, y, names):
        """The number of classes."""
        if y.dim() != 1 or int(y.min()) < 0:
            raise UserError("model.condition=label needs a class label for every training example; this data "
                            f"has {'attribute columns (use model.condition=attributes)' if y.dim() == 2 else 'none'}")
        return int(y.max()) + 1

    def rows(self):
        return [(str(k), torch.tensor(k)) for k in range(self.width)]

    def of(self, chosen):
        require(isinstance(chosen, int) and not isinstance(chosen, bool), "label", chosen,
                f"a class 0…{self.width - 1}")
        return torch.tensor(chosen)


class Attributes(Condition):
    """Attributes (CelebA's, with data.target=all: one 0/1 column each) as ±1, named by `labels`."""

    def __init__(self, labels):
        names = list(labels or [])
        require(len(names) >= 1 and all(isinstance(n, str) for n in names), "model.labels", labels,
                "the attribute names (from a data set with attribute columns, e.g. data=celeba data.target=all)")
        self.names, self.width = names, len(names)

    def vector(self, y, n):
        if y is None:
            raise UserError("this model is conditional (model.condition=attributes): give each example's "
                            "attributes (a split's own, or attributes=[…])")
        y = torch.as_tensor(y)
        y = y.reshape(1, -1).expand(n, -1) if y.dim() == 1 else y
        if y.shape[1] != self.width:
            raise UserError(f"attributes of {y.shape[1]} columns do not fit this model's {self.width} ({', '.join(self.names)})")
        return y.float() * 2 - 1

    @classmethod
    def labels_from(cls, y, names):
        """The attribute names."""
        if y.dim() != 2 or len(names) != y.shape[1]:
            raise UserError("model.condition=attributes needs data with named attribute columns, such as "
                            "data=celeba data.target=all; for class labels use model.condition=label")
        return list(names)

    def rows(self):
        """Each of the first ten attributes alone (the others absent)."""
        return [(name, self.of([name])) for name in self.names[:10]]

    def of(self, chosen):
        chosen = list(chosen) if isinstance(chosen, (list, tuple)) else [chosen]
        unknown = [a for a in chosen if a not in self.names]
        if unknown:
            raise UserError(f"attributes={unknown} are not this model's; choose from {', '.join(self.names)}")
        return torch.tensor([int(n in chosen) for n in self.names])
