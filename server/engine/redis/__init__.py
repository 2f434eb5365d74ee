"""The split deployment on Redis: the API's engine client, the job streams, the shared storage."""
