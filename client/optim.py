"""Optimizers for `client.train`: `gg.optim.SGD(lr, momentum)` and `gg.optim.Adam(lr, ...)`."""

from graphgrad.engine import SGD, Adam

__all__ = ["SGD", "Adam"]
