"""mmcv 1.x's DDP wrapper made to work on torch 2.x, where BEVFusion users now train."""

from __future__ import annotations

from typing import Any

from mmcv.parallel import MMDistributedDataParallel


class DistributedDataParallel(MMDistributedDataParallel):
    """MMDistributedDataParallel whose forward (used by eval) no longer reads a DDP attribute torch 2.x removed."""

    def _run_ddp_forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """Move inputs to this rank's device (when it has one) and run the wrapped module's forward."""
        if self.device_ids:
            inputs, kwargs = self.to_kwargs(inputs, kwargs, self.device_ids[0])
            return self.module(*inputs[0], **kwargs[0])
        return self.module(*inputs, **kwargs)
