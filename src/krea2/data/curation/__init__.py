"""Data curation: the image table as a job queue (krablets), ingest, filters, dedup, captions, training rows."""
