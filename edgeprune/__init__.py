"""edgeprune: compile convolutional networks for edge devices under a latency budget.

The Python API (each function is typed and documented in edgeprune.api):

    compile(model, target, out)        a model file, a Network or a torch module -> Build
    load(directory)                    a build directory -> Build
    run(build, inputs, device)         outputs, on this machine, under qemu, on an RPC or serial board
    measure(build, device)             -> Measurement: median, p10, p90, per-kernel profile
    check(build, budget_ms, device)    -> CheckResult: the CI latency gate
    build(target, budget_ms, out)      search, compress, compile and measure under a budget -> report
    targets()                          the known device targets
"""

# The measure stage is a sub-package of the same name as the API's measure(): importing a sub-package binds it on
# its parent, so it is loaded first and the function bound after it stays (a later import does not rebind).
from . import measure as _measure_stage  # noqa: F401, I001
from .api import CheckResult, build, check, compile, load, measure, run, targets
from .artifacts import Build, LayerCost, LayerPlan, Measurement, Network, TensorSpec
from .errors import UserError
from .version import __version__

__all__ = ["Build", "CheckResult", "LayerCost", "LayerPlan", "Measurement", "Network", "TensorSpec", "UserError",
           "__version__", "build", "check", "compile", "load", "measure", "run", "targets"]
