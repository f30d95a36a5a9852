"""Chat-model backends for stage 1 (prompt writing) and later the DSG-style evaluator."""
