"""Database backends of FetchML (set by `DATABASE_URL`)."""
