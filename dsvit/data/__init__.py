"""Data: shard writing (tools), the streaming webdataset pipeline, the embedded synthetic dataset."""
