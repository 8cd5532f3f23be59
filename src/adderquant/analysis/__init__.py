"""Analysis of models, apart from running them: operation counts (:mod:`.counting`), the energy model
(:mod:`.energy`) and its reports (:mod:`.energy_report`, behind ``adderquant energy``), the shift/add
cost of APoT (:mod:`.apot_cost`) and the weight vs activation range report (:mod:`.ranges`, behind
``adderquant report ranges``).

It may import the rest of the package; nothing in the package imports it but the CLI. The two
``format_table`` functions (energy rows, range statistics) stay in their modules.
"""

from __future__ import annotations

from .apot_cost import apot_shift_add_cost, compare_resnet50, layer_macs
from .counting import LayerCount, ModelCount, count_model, count_named
from .energy import EnergyTable, accumulator_bits, group_overhead_ratio, proposition2_ratio, tally, tally_flops
from .energy_report import energy_command, load_accuracies, model_report, plot_accuracy_vs_energy, variant_row
from .ranges import LayerRanges, plot_distributions, plot_ranges, range_statistics, report_ranges

__all__ = [
    "EnergyTable", "LayerCount", "LayerRanges", "ModelCount", "accumulator_bits", "apot_shift_add_cost",
    "compare_resnet50", "count_model", "count_named", "energy_command", "group_overhead_ratio", "layer_macs",
    "load_accuracies", "model_report", "plot_accuracy_vs_energy", "plot_distributions", "plot_ranges",
    "proposition2_ratio", "range_statistics", "report_ranges", "tally", "tally_flops", "variant_row",
]
