"""Storage: the database schema, data access, the trainer lease and arena results over stored votes."""
