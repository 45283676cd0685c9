"""batch_score: a chat model over a dataset on Spark, and the UDF model it runs."""
