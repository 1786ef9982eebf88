"""Pipeline operations: the stage table and runner, stages, MLflow tracking, Optuna."""
