"""shelf: the Spark side. One module per pipeline step, shared machinery in `pipelines.core`."""
