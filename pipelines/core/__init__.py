"""Shared machinery: config, Spark session, schemas, table I/O, logging, CLI."""
