"""The lab: `nerd bench` (speed, memory, solver figures side by side) and `nerd experiment` (the paper's ablations).

These measure NERD; the library under `nerd` never imports them. Entry points: `nerd.lab.bench.run_bench`,
`nerd.lab.experiments.run_experiment`, and the `nerd bench` / `nerd experiment` commands.
"""
