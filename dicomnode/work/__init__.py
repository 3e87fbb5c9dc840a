"""Work: routing, inference and the worker pipeline that drains the job queue."""
