"""One scored row: the fields batch_score's UDF returns for each input row and the Spark types
the output table has. Shipped inside the UDF's model (MLflow `code_paths`) beside the chat core,
and read by batch_score, so both sides name the columns from here."""

# (column, Spark SQL type) in output order
RESULT_COLUMNS = (("answer", "STRING"), ("finish_reason", "STRING"), ("prompt_tokens", "INT"),
                  ("completion_tokens", "INT"), ("latency_s", "DOUBLE"), ("error", "STRING"))
RESULT_FIELDS = tuple(name for name, _ in RESULT_COLUMNS)
RESULT_SCHEMA = ", ".join(f"{name} {kind}" for name, kind in RESULT_COLUMNS)
