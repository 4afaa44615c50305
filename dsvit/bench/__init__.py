"""`dsvit bench`: methods side by side (accuracy runs interleaved on the cores) and throughput-only step speed."""
