"""Lightning strategies used by svdecode-pl.

``CPUDeepSpeedStrategy`` is a TEST / CI CONVENIENCE ONLY. It runs Lightning's
``DeepSpeedStrategy`` (ZeRO stage 1/2/3) on CPU processes with the gloo backend so
that the DeepSpeed code path of the project (``configure_model`` under
``deepspeed.zero.Init``, gathering ZeRO-3 parameters, DeepSpeed checkpoints) can be
exercised on machines without a GPU. It is slow and is not meant for real training:
real runs use ``lightning.pytorch.strategies.DeepSpeedStrategy`` on CUDA (see
``configs/strategy/deepspeed_zero*.yaml``).

What it changes relative to ``DeepSpeedStrategy`` (Lightning 2.6):

* DeepSpeed's own accelerator abstraction is forced to CPU (``DS_ACCELERATOR=cpu`` for
  child processes + ``deepspeed.accelerator.set_accelerator`` in this process), so even
  on a GPU host DeepSpeed never touches CUDA.
* ``setup_environment``: the parent raises unless the Lightning accelerator is a
  ``CUDAAccelerator``; here a ``CPUAccelerator`` is required instead, and only
  ``precision="32-true"`` is accepted (no fp16/bf16 on this path).
* ``parallel_devices``: Lightning gives CPU processes the index-less device ``cpu``,
  but (a) ``setup_distributed`` validates that device indices equal the local ranks and
  (b) ``deepspeed.initialize(args=Namespace(device_rank=root_device.index))`` compares
  the index with ``>= 0``. Process ``i`` is therefore given ``torch.device("cpu", i)``;
  PyTorch treats every ``cpu:i`` as the one CPU, and DeepSpeed's CPU accelerator ignores
  the index (``set_device`` is a no-op, ``device_name`` is ``"cpu"``).
* the process group backend defaults to ``gloo``.
* ``param_persistence_threshold`` (DeepSpeed's ``stage3_param_persistence_threshold``, which the
  parent cannot set without a whole config): ZeRO-3 keeps parameters smaller than this whole on
  every process. DeepSpeed's default (1e5) is above every parameter of a tiny test model, so
  nothing would be sharded; 0 shards them all.
* DeepSpeed-side optimizers (``"optimizer"`` in the DeepSpeed config) are refused. Return a
  ``torch.optim`` optimizer from ``configure_optimizers`` (Lightning already sets
  ``zero_allow_untested_optimizer=True``); under ZeRO-Offload (``offload_optimizer``) DeepSpeed
  requires ``deepspeed.ops.adam.DeepSpeedCPUAdam`` instead (``svdecode_pl.recipes.optimizer.build_optimizer``
  picks it), whose C++ op is JIT-compiled on first use (~3-6 min on 2 cores, then cached in
  ``~/.cache/torch_extensions``). Use ``pin_memory=False``: there is no pinned memory without CUDA.

Everything else (``configure_model`` inside ``deepspeed.zero.Init`` for stage 3,
``deepspeed_engine.save_checkpoint``/``load_checkpoint`` for ``trainer.save_checkpoint``
and ``ckpt_path=...``) is the unmodified parent code.

Registered names (after ``import svdecode_pl.recipes.strategies``): ``deepspeed_cpu``,
``deepspeed_cpu_stage_1``, ``deepspeed_cpu_stage_2``, ``deepspeed_cpu_stage_3``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy, StrategyRegistry
from lightning.pytorch.strategies.ddp import DDPStrategy

__all__ = ["CPUDeepSpeedStrategy"]


def _force_deepspeed_cpu_accelerator() -> None:
    """Make DeepSpeed use its CPU accelerator in this process and in launched children."""
    os.environ["DS_ACCELERATOR"] = "cpu"  # inherited by Lightning's subprocess launcher
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if get_accelerator().device_name() != "cpu":  # deepspeed was imported earlier and picked CUDA
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())
    # deepspeed.init_distributed on the CPU accelerator JIT-compiles a shared-memory all-reduce op (C++, ~1 min on
    # 2 cores; used only by DeepSpeed inference kernels). Mark it incompatible so DeepSpeed falls back to gloo.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` on CPU processes (gloo). Test/CI convenience only - see module docstring.

    Use with ``Trainer(accelerator="cpu", devices=N, precision="32-true", strategy=CPUDeepSpeedStrategy(stage=...))``.
    Accepts the same arguments as :class:`~lightning.pytorch.strategies.DeepSpeedStrategy`, plus
    ``param_persistence_threshold`` (ZeRO-3: parameters with fewer elements stay whole; 0 shards all).
    """

    strategy_name = "deepspeed_cpu"

    def __init__(
        self,
        *args: Any,
        process_group_backend: str | None = "gloo",
        param_persistence_threshold: int | None = None,
        **kwargs: Any,
    ) -> None:
        _force_deepspeed_cpu_accelerator()
        super().__init__(*args, process_group_backend=process_group_backend, **kwargs)
        assert isinstance(self.config, dict)
        if param_persistence_threshold is not None:
            self.config.setdefault("zero_optimization", {})["stage3_param_persistence_threshold"] = (
                param_persistence_threshold
            )
        if "optimizer" in self.config:
            raise ValueError(
                f"{type(self).__name__} does not support DeepSpeed config optimizers (they need compiled DeepSpeed"
                " ops). Return a torch.optim optimizer from `configure_optimizers` (DeepSpeedCPUAdam under offload)."
            )

    # Lightning gives every CPU process the device `cpu` (index None); give process i `cpu:i` instead, which
    # satisfies `_validate_device_index_selection` and DeepSpeed's `device_rank >= 0` check.
    @property
    def parallel_devices(self) -> list[torch.device] | None:
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, parallel_devices: list[torch.device] | None) -> None:
        if parallel_devices is not None:
            parallel_devices = [torch.device("cpu", i) for i in range(len(parallel_devices))]
        self._parallel_devices = parallel_devices

    def setup_environment(self) -> None:
        # Replaces DeepSpeedStrategy.setup_environment, whose only job is to refuse non-CUDA accelerators.
        if not isinstance(self.accelerator, CPUAccelerator):
            raise RuntimeError(f"{type(self).__name__} requires `accelerator='cpu'`, got {self.accelerator!r}.")
        if self.precision_plugin.precision != "32-true":
            raise RuntimeError(
                f"{type(self).__name__} only supports `precision='32-true'`, got {self.precision_plugin.precision!r}."
            )
        DDPStrategy.setup_environment(self)  # -> Strategy.setup_environment + self.setup_distributed()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="DeepSpeed on CPU/gloo (tests only)")
        for stage in (1, 2, 3):
            strategy_registry.register(
                f"deepspeed_cpu_stage_{stage}",
                cls,
                description=f"DeepSpeed ZeRO-{stage} on CPU (tests only)",
                stage=stage,
            )


if CPUDeepSpeedStrategy.strategy_name not in StrategyRegistry:
    CPUDeepSpeedStrategy.register_strategies(StrategyRegistry)
