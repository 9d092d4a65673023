"""The Batch API: uploaded files, batch jobs, and the runner that answers their lines exactly once."""
