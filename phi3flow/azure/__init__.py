"""The azureml-v2 MLflow project backend and what its Azure ML jobs run first."""
