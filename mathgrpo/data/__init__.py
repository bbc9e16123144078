"""Prompts: verl's parquet schema, the chat template, resumable batches."""
