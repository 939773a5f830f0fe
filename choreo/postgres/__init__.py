"""PostgreSQL: saga state and transactional handlers (extra ``choreo-saga[postgres]``)."""
