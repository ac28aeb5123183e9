"""Measurement: the benchmark, the reports' measuring code, profiling and synthetic data (above ki_data and ki_model).

- `figures`: the one list of figure records (what a and b are, unit, target and direction, how each is computed);
  the JSON, the table and the tests read it. `report` renders them; `run` orchestrates the phases; `settings` holds
  the modes.
- `timing`: the one interleaved-median helper, peak resident memory, isolated processes.
- phases by what they measure: `datasets` (recorded once, cached), `preprocess`, `loader`, `model`.
- `synthetic`: real-format synthetic batches and tokenizers (the model tests use them); `fast_tokens`: FAST vs binning.

Nothing in ki_data or ki_model imports this package.
"""
