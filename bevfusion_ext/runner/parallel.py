"""mmcv 1.x's DDP wrapper made to work on torch 2.x and on the CPU, where BEVFusion users now train and test."""

from __future__ import annotations

from typing import Any

from mmcv.parallel import DataContainer, MMDistributedDataParallel


def unwrap_batch(obj: Any) -> Any:
    """A collated batch as the model sees it on one device: mmcv DataContainers replaced by their data.

    mmcv's collate wraps BEVFusion's fields in DataContainers (one chunk per GPU); its scatter unwraps them only when
    there are device ids. On the CPU there are none, so this does what MMDataParallel's CPU scatter does.
    """
    if isinstance(obj, DataContainer):
        return obj.data[0]
    if isinstance(obj, dict):
        return {k: unwrap_batch(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(unwrap_batch(v) for v in obj)
    return obj


class DistributedDataParallel(MMDistributedDataParallel):
    """MMDistributedDataParallel that unwraps DataContainers on the CPU and no longer reads a DDP attribute torch
    2.x removed (eval forward)."""

    def _sync_params(self) -> None:
        """What mmcv 1.4's train_step calls and torch 2.x removed: parameters are only broadcast at construction
        now, so only buffers are left to sync (and only when broadcast_buffers is on; BEVFusion turns it off)."""
        if self.broadcast_buffers:
            self._sync_buffers()

    def train_step(self, *inputs: Any, **kwargs: Any) -> Any:
        """mmcv's train_step, with the batch unwrapped when there is no device to scatter to."""
        if not self.device_ids:
            inputs, kwargs = unwrap_batch(inputs), unwrap_batch(kwargs)
        return super().train_step(*inputs, **kwargs)

    def val_step(self, *inputs: Any, **kwargs: Any) -> Any:
        """mmcv's val_step, with the batch unwrapped when there is no device to scatter to."""
        if not self.device_ids:
            inputs, kwargs = unwrap_batch(inputs), unwrap_batch(kwargs)
        return super().val_step(*inputs, **kwargs)

    def _run_ddp_forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """Move inputs to this rank's device (when it has one) and run the wrapped module's forward."""
        if self.device_ids:
            inputs, kwargs = self.to_kwargs(inputs, kwargs, self.device_ids[0])
            return self.module(*inputs[0], **kwargs[0])
        return self.module(*unwrap_batch(inputs), **unwrap_batch(kwargs))
