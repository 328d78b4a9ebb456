"""Tests of the Azure ML emulator (airflow_stepops.testing.azureml)."""
