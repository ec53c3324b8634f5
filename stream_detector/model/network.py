"""The hybrid network: a shared encoder, a reconstruction decoder and a forecasting decoder.

Input is a window ``x`` of shape ``(B, W, F)`` (batch, window length, features), already scaled.
The encoder is causal and returns a state per step, ``(B, W, H)``; one encoder is shared by:

* the **reconstruction decoder**: squeezes the state after the *newest* reading through a narrow
  bottleneck (``latent`` < F) and rebuilds the whole window ``(B, W, F)``. A reading that breaks
  the learned normal structure (a correlation break, a stuck sensor, a level shift) cannot be
  rebuilt through the bottleneck;
* the **forecasting decoder**: from the state after the context ``x[:, :W-1]`` it predicts the
  newest reading ``x[:, W-1]`` (a residual on the last context step), which it has not seen.

``forward`` returns per-feature squared errors ``(rec_err, fc_err)``, each ``(B, F)``: the
reconstruction error of the newest reading and its forecast error. Both refer to the newest
reading, so a window's score is about the reading that completed it. Training minimises
``MSE(rebuilt window) + lambda * MSE(forecast)`` (:meth:`HybridModel.training_loss`). Returning
errors rather than outputs keeps the serving contract tiny: a window in, two error terms out.

Encoders are chosen by name from :data:`ENCODERS`; each maps ``(B, T, F) -> (B, T, H)`` causally
(the output at step ``t`` depends on steps ``<= t`` only), so a Transformer encoder with a causal
mask fits behind the same interface.
"""

from __future__ import annotations

import torch
from torch import nn


class LSTMEncoder(nn.Module):
    """LSTM over the window; returns the last layer's output at every step."""

    def __init__(self, n_features: int, hidden: int, layers: int = 1) -> None:
        super().__init__()
        self.rnn = nn.LSTM(n_features, hidden, num_layers=layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return out


class GRUEncoder(nn.Module):
    """GRU over the window; cheaper than the LSTM at the same hidden size."""

    def __init__(self, n_features: int, hidden: int, layers: int = 1) -> None:
        super().__init__()
        self.rnn = nn.GRU(n_features, hidden, num_layers=layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return out


class TCNEncoder(nn.Module):
    """Causal dilated 1-D convolutions (kernel 3, dilations 1, 2, 4, ...). ``layers`` layers see
    ``2 ** (layers + 1) - 1`` steps; :class:`HybridModel` adds layers until that covers the
    window (:func:`tcn_layers`)."""

    def __init__(self, n_features: int, hidden: int, layers: int = 3) -> None:
        super().__init__()
        convs = []
        pads = []
        channels = n_features
        for i in range(max(layers, 1)):
            dilation = 2**i
            convs.append(nn.Conv1d(channels, hidden, kernel_size=3, dilation=dilation))
            pads.append(2 * dilation)
            channels = hidden
        self.convs = nn.ModuleList(convs)
        self.pads = pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.transpose(1, 2)
        i = 0
        for conv in self.convs:
            y = torch.relu(conv(nn.functional.pad(y, (self.pads[i], 0))))
            i += 1  # noqa: SIM113 - TorchScript-friendly indexing
        return y.transpose(1, 2)


ENCODERS: dict[str, type[nn.Module]] = {
    "lstm": LSTMEncoder,
    "gru": GRUEncoder,
    "tcn": TCNEncoder,
}


class HybridModel(nn.Module):
    """Shared encoder + reconstruction decoder + forecasting decoder; see the module docstring."""

    def __init__(
        self,
        n_features: int,
        window: int,
        hidden: int = 64,
        encoder: str = "lstm",
        layers: int = 1,
        latent: int = 0,
    ) -> None:
        super().__init__()
        if window < 3:
            raise ValueError(f"window must be at least 3, got {window}")
        if encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {encoder!r}; known: {sorted(ENCODERS)}")
        self.n_features = n_features
        self.window = window
        self.context = window - 1
        self.latent = latent if latent > 0 else default_latent(n_features)
        if encoder == "tcn":  # a convolution stack too shallow to see the whole window
            layers = max(layers, tcn_layers(window))
        self.layers = layers
        self.encoder = ENCODERS[encoder](n_features, hidden, layers)
        self.bottleneck = nn.Linear(hidden, self.latent)
        self.reconstruct = nn.Sequential(
            nn.Linear(self.latent, hidden * 2),
            nn.ReLU(),
            nn.Linear(hidden * 2, window * n_features),
        )
        self.forecast = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_features)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(x)  # (B, W, H), causal: step t has seen x[:, :t+1]
        rec = self.reconstruct(self.bottleneck(out[:, -1, :])).view(-1, self.window,
                                                                   self.n_features)
        fc = x[:, self.context - 1, :] + self.forecast(out[:, self.context - 1, :])
        rec_sq = (rec - x).pow(2)
        # score term: the newest reading's reconstruction error (timely), while training fits
        # the whole window (see training_loss)
        rec_err = rec_sq[:, -1, :]
        fc_err = (fc - x[:, self.context, :]).pow(2)
        return rec_err, fc_err

    @torch.jit.export
    def training_loss(self, x: torch.Tensor, lambda_fc: float) -> torch.Tensor:
        out = self.encoder(x)
        rec = self.reconstruct(self.bottleneck(out[:, -1, :])).view(-1, self.window,
                                                                   self.n_features)
        fc = x[:, self.context - 1, :] + self.forecast(out[:, self.context - 1, :])
        return (rec - x).pow(2).mean() + lambda_fc * (fc - x[:, self.context, :]).pow(2).mean()


def default_latent(n_features: int) -> int:
    """Bottleneck width when not given: narrower than the reading, so the newest reading cannot
    be copied through and has to be explained by the learned normal structure."""
    return max(2, min(16, n_features // 2))


def tcn_layers(window: int) -> int:
    """Fewest dilated layers (kernel 3, dilations 1, 2, 4, ...) whose receptive field,
    ``2 ** (layers + 1) - 1`` steps, covers ``window`` readings."""
    layers = 1
    while 2 ** (layers + 1) - 1 < window:
        layers += 1
    return layers
