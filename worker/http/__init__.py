"""`macao-ocr api`: the HTTP front door (FastAPI). Stateless: all state is in PostgreSQL and
Redis, so several processes or hosts can serve it behind one load balancer."""
