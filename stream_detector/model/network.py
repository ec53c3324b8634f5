"""The hybrid network: a shared encoder, a reconstruction decoder and a forecasting decoder.

Input is a window ``x`` of shape ``(B, W, F)`` (batch, window length, features), already scaled.
The encoder reads the *context* ``x[:, :W-1]`` and summarises it into ``h`` of shape ``(B, H)``:

* the reconstruction decoder rebuilds the whole context ``(B, W-1, F)`` from ``h``;
* the forecasting decoder predicts the next step ``x[:, W-1]`` (as a residual on the last
  context step), which the encoder never saw.

``forward`` returns per-feature squared errors, ``(rec_err, fc_err)``, each ``(B, F)``:
``rec_err`` is the squared reconstruction error averaged over the context steps and ``fc_err``
the squared forecast error of the newest reading. The training loss is
``rec_err.mean() + lambda * fc_err.mean()``. Returning errors rather than outputs keeps the
serving contract tiny: the consumer hands a window in and gets the two error terms back.

Encoders are chosen by name from :data:`ENCODERS`; each maps ``(B, T, F) -> (B, H)``.
"""

from __future__ import annotations

import torch
from torch import nn


class LSTMEncoder(nn.Module):
    """LSTM over the context; the summary is the last layer's final hidden state."""

    def __init__(self, n_features: int, hidden: int, layers: int = 1) -> None:
        super().__init__()
        self.rnn = nn.LSTM(n_features, hidden, num_layers=layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.rnn(x)
        return h[-1]


class GRUEncoder(nn.Module):
    """GRU over the context; cheaper than the LSTM at the same hidden size."""

    def __init__(self, n_features: int, hidden: int, layers: int = 1) -> None:
        super().__init__()
        self.rnn = nn.GRU(n_features, hidden, num_layers=layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.rnn(x)
        return h[-1]


class TCNEncoder(nn.Module):
    """Causal dilated 1-D convolutions (kernel 3, dilations 1, 2, 4, ...), last time step."""

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
            i += 1
        return y[:, :, -1]


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
    ) -> None:
        super().__init__()
        if window < 3:
            raise ValueError(f"window must be at least 3, got {window}")
        if encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {encoder!r}; known: {sorted(ENCODERS)}")
        self.n_features = n_features
        self.window = window
        self.context = window - 1
        self.encoder = ENCODERS[encoder](n_features, hidden, layers)
        self.reconstruct = nn.Sequential(
            nn.Linear(hidden, hidden * 2), nn.ReLU(), nn.Linear(hidden * 2, self.context * n_features)
        )
        self.forecast = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_features)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = x[:, : self.context, :]
        h = self.encoder(ctx)
        rec = self.reconstruct(h).view(-1, self.context, self.n_features)
        fc = ctx[:, -1, :] + self.forecast(h)
        rec_err = (rec - ctx).pow(2).mean(dim=1)
        fc_err = (fc - x[:, self.context, :]).pow(2)
        return rec_err, fc_err
