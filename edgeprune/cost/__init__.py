"""The cost model: what a layer costs on a device, before and after it is measured.

    rows.py      LayerCost rows, made the same way from a subnet's architecture and from a compiled kernel
    model.py     the latency model: measured lookups, per-class fits, the roofline prior from the target
    table.py     latency tables on disk (<data dir>/calibrate/<device>.json; shipped ones read-only), atomic
    identity.py  who measured a table

It sits below search, codegen and measure: the search prices subnets with it, codegen reports rows into it, and
measurements teach it.
"""

from .model import LatencyModel, Prediction, model_for
from .table import entry_of, find_table, learn, load_table, new_table, save_table, table_path

__all__ = ["LatencyModel", "Prediction", "entry_of", "find_table", "learn", "load_table", "model_for", "new_table",
           "save_table", "table_path"]
