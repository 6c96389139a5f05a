"""A small Lightning module and data, shared by the Lightning tests, their job script and
the Lightning benchmark."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class Regressor(L.LightningModule):
    """An MLP regressor with Adam. ``scores``: the value logged as ``score`` after each
    validation epoch (scripted, so top-k decisions are known in advance)."""

    def __init__(self, width: int = 32, depth: int = 2, scores: list[float] | None = None):
        super().__init__()
        self.save_hyperparameters()
        layers: list[torch.nn.Module] = [torch.nn.Linear(8, width), torch.nn.Tanh()]
        for _ in range(depth - 1):
            layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))
        self.scores = scores

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.scores is not None and not self.trainer.sanity_checking:
            self.log("score", float(self.scores[self.current_epoch]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def dataset(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, x.sum(dim=1, keepdim=True).sin() + 0.1 * torch.randn(n, 1, generator=g))


def loader(n: int = 64, batch_size: int = 8, shuffle: bool = True) -> DataLoader:
    """``shuffle=True`` under DDP becomes Lightning's DistributedSampler (seeded per epoch:
    the same order after a resume); in one process it draws from the global generator."""
    return DataLoader(dataset(n), batch_size=batch_size, shuffle=shuffle)


def final_state(module: L.LightningModule, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Parameters and optimizer state tensors, flat (for bit-for-bit comparisons)."""
    out = {f"model.{k}": v.detach().clone() for k, v in module.state_dict().items()}
    for pid, st in optimizer.state_dict()["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"optim.{pid}.{k}"] = v.detach().clone().reshape(v.shape)
    return out
