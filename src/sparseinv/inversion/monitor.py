"""The loss for the progress bar and the divergence check, read without stalling the device.

Reading a device tensor's value (``.item()``, ``bool(...)``) makes the host wait until
the GPU has finished everything queued so far; done every step, Python and kernel
launches then add to GPU time instead of hiding behind it. So the step loop only
*snapshots* the loss every few steps (on the device, into a pinned host buffer,
asynchronously) and reads a snapshot once the device has long passed it: at the next
snapshot, or when the phase ends and the loop waits for the device anyway.
"""

from __future__ import annotations

import torch

from sparseinv.errors import UsageError


class StepMonitor:
    """Snapshots of (mean loss, all finite) taken every ``every`` steps, read one behind.

    Args:
        device: Where the loss lives.
        lr: The learning rate, named in the divergence error.
        every: Steps between snapshots.
    """

    def __init__(self, device: torch.device, lr: float, every: int = 10) -> None:
        self.device, self.lr, self.every = device, lr, every
        self.loss: float | None = None  # the newest loss read back
        self._pending: list[tuple[int, torch.Tensor, torch.cuda.Event | None]] = []

    def due(self, step: int, last: bool) -> bool:
        """Whether step ``step`` (1-based) is snapshotted: every ``every``-th and a phase's last."""
        return last or step % self.every == 0

    def snapshot(self, per_image: torch.Tensor, step: int) -> None:
        """Queue a copy of this step's loss to the host; nothing waits for it."""
        per_image = per_image.detach().float()
        values = torch.stack([per_image.mean(), torch.isfinite(per_image).all().float()])
        if self.device.type == "cuda":
            host = torch.empty(2, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = values, None
        self._pending.append((step, host, event))
        # The one before is older than the steps queued since: reading it costs no stall.
        while len(self._pending) > 1:
            self._read(*self._pending.pop(0))

    def flush(self) -> None:
        """Read every snapshot taken (call where the loop waits for the device anyway)."""
        while self._pending:
            self._read(*self._pending.pop(0))

    def _read(self, step: int, host: torch.Tensor, event) -> None:
        if event is not None:
            event.synchronize()
        loss, finite = host.tolist()
        if not finite:
            raise UsageError(
                f"inversion diverged: the loss is not finite at step {step}; lower --lr (now {self.lr}) or the loss weights. "
                "Batches finished before this one are kept."
            )
        self.loss = loss
