"""The C package (`--format c`): a network as plain C for firmware, with no heap, no threads and no file I/O.

TVM 0.27 has no AOT executor, so the executor is ours, built in three steps, one module each:

- `program`: read the scheduled Relax module's main function, a straight line of ``call_tir`` kernels, into a
  `Plan` of `Tensor`s and `Step`s (`extract_plan`); `root_tensor` follows a reshape to the tensor that owns its
  storage.
- `memory`: lay the tensors out: arena offsets from tensor lifetimes so dead tensors' bytes are reused
  (`plan_memory`, which `extract_plan` runs), weight-blob offsets, and the kernels' scratch in the arena
  (`workspace_per_kernel`, `place_workspace`).
- `emit`: write ``model.c``, the header, the weights, the runtime and the build files (`write_package`), and
  the id that names the build (`build_id`).
"""

from .emit import build_id, write_package
from .memory import place_workspace, plan_memory, workspace_per_kernel
from .program import Plan, Step, Tensor, extract_plan, root_tensor

__all__ = ["Plan", "Step", "Tensor", "build_id", "extract_plan", "place_workspace", "plan_memory", "root_tensor",
           "workspace_per_kernel", "write_package"]
